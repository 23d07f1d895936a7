"""Hugging Face data sets as chatforge data (trainer/data/sources.py, readers.py): real files of
each format written by `datasets` itself, in each of the shapes TRL / OpenRLHF users have,
read through the readers and checked by the launcher before a run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before datasets reads it: the tests never reach the hub
import datasets  # noqa: E402
import pytest  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from trainer.data.chat import Message  # noqa: E402
from trainer.data.chat_prepare import conversations, pairs, prompts, rl_prompt_items  # noqa: E402
from trainer.data.readers import (PreferencePair, detect_format, read_chatml, read_hh_rlhf_report,  # noqa: E402
                                  read_pairs, read_preference, read_prompts, read_texts, sniff)
from trainer.data.sources import missing_path_problem, sources  # noqa: E402

CHATS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                  {"role": "assistant", "content": "6"}]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
]
EXPECTED_CHATS = [[Message(m["role"], m["content"]) for m in c["messages"]] for c in CHATS]


def _write(rows: list[dict[str, Any]], path: Path) -> Path:
    """`rows` saved by `datasets` in the format `path` names (a suffix, or a save_to_disk dir)."""
    ds = datasets.Dataset.from_list(rows)
    if path.suffix == ".jsonl":
        ds.to_json(str(path), lines=True)
    elif path.suffix == ".json":
        ds.to_json(str(path), lines=False)
    elif path.suffix == ".parquet":
        ds.to_parquet(str(path))
    elif path.suffix == ".csv":
        ds.to_csv(str(path), index=False)
    else:
        ds.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("name", ["c.jsonl", "c.json", "c.parquet", "saved"])
def test_conversational_data_in_every_format(tmp_path: Path, name: str) -> None:
    path = _write(CHATS, tmp_path / name)
    assert read_chatml(path) == EXPECTED_CHATS
    assert detect_format(path) == "chatml" and sniff("chatml", path) is None


def test_prompt_completion_is_a_conversation(tmp_path: Path) -> None:
    rows = [{"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]},
            {"prompt": [{"role": "user", "content": "3+3?"}], "completion": [{"role": "assistant", "content": "6"}]}]
    path = _write(rows, tmp_path / "pc.parquet")
    assert detect_format(path) == "chatml"
    assert read_chatml(path)[1] == [Message("user", "3+3?"), Message("assistant", "6")]
    strings = _write([{"prompt": "2+2?", "completion": "4"}], tmp_path / "pc.jsonl")
    assert read_chatml(strings) == [[Message("user", "2+2?"), Message("assistant", "4")]]
    assert prompts(_cfg("auto", strings)) == [[Message("user", "2+2?")]]
    with_answer = _write([{"prompt": "2+2?", "completion": "It is 4.", "answer": "4"}], tmp_path / "a.parquet")
    assert rl_prompt_items(_cfg("auto", with_answer)) == [
        ([Message("user", "2+2?")], {"completion": "It is 4.", "answer": "4"})]  # fields reach the rewards


def test_shards_and_dataset_dicts(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    _write(CHATS[:1], shards / "part-00000.parquet")
    _write(CHATS[1:], shards / "part-00001.parquet")
    assert read_chatml(shards) == EXPECTED_CHATS
    snapshot = tmp_path / "snapshot"  # as a hub snapshot lays out its splits
    (snapshot / "data").mkdir(parents=True)
    _write(CHATS[:1], snapshot / "data" / "train-00000-of-00002.parquet")
    _write(CHATS[1:], snapshot / "data" / "train-00001-of-00002.parquet")
    _write(CHATS, snapshot / "data" / "test-00000-of-00001.parquet")
    assert read_chatml(snapshot) == EXPECTED_CHATS
    both = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(CHATS),
                          "test": datasets.Dataset.from_list(CHATS[:1])}).save_to_disk(str(both))
    assert read_chatml(both) == EXPECTED_CHATS  # the train split
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write(CHATS, mixed / "a.parquet")
    _write(CHATS, mixed / "b.jsonl")
    with pytest.raises(ValueError, match="mixes data file types"):
        sources(mixed)


def test_preference_shapes(tmp_path: Path) -> None:
    explicit = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    conversational = [{"prompt": [{"role": "user", "content": "2+2?"}],
                       "chosen": [{"role": "assistant", "content": "4"}],
                       "rejected": [{"role": "assistant", "content": "5"}]}]
    implicit = [{"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                 "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}]
    want = [PreferencePair([Message("user", "2+2?")], "4", "5")]
    for i, rows in enumerate((explicit, conversational, implicit)):
        for suffix in (".parquet", ".jsonl"):
            path = _write(rows, tmp_path / f"p{i}{suffix}")
            assert read_pairs("preference", path) == want, (rows, suffix)
            assert detect_format(path) == "preference"
    csv = _write(explicit, tmp_path / "p.csv")
    assert read_preference(csv) == want
    bad = _write([{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "4"}],
                   "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "5"}]}],
                 tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: row 0: 'chosen' and 'rejected' differ"):
        read_preference(bad)


def test_prompt_only_keeps_its_fields(tmp_path: Path) -> None:
    rows = [{"prompt": [{"role": "user", "content": "What is 2+2?"}], "answer": "4"},
            {"prompt": [{"role": "system", "content": "Think."}, {"role": "user", "content": "3*3?"}],
             "answer": "9"}]
    path = _write(rows, tmp_path / "prompts.parquet")
    items = read_prompts(path)
    assert items == [([Message("user", "What is 2+2?")], {"answer": "4"}),
                     ([Message("system", "Think."), Message("user", "3*3?")], {"answer": "9"})]
    assert detect_format(path) == "prompts"


def test_column_mapping(tmp_path: Path) -> None:
    rows = [{"question": "2+2?", "good": "4", "bad": "5"}]
    path = _write(rows, tmp_path / "p.parquet")
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert read_preference(path, columns)[0].chosen == "4"
    assert sniff("preference", path, columns=columns) is None
    assert "missing key 'prompt'" in str(sniff("preference", path))
    cfg = _cfg("auto", path, columns)
    assert [p.rejected for p in pairs(cfg)] == ["5"]
    assert conversations(cfg) == [[Message("user", "2+2?"), Message("assistant", "4")]]
    assert prompts(cfg) == [[Message("user", "2+2?")]]


def test_auto_format_through_the_stage_readers(tmp_path: Path) -> None:
    path = _write(CHATS, tmp_path / "saved")
    assert conversations(_cfg("auto", path)) == EXPECTED_CHATS
    assert prompts(_cfg("auto", path))[0] == EXPECTED_CHATS[0][:-1]
    answers = _write([{"prompt": "2+2?", "answer": "4"}], tmp_path / "q.jsonl")
    assert rl_prompt_items(_cfg("auto", answers)) == [([Message("user", "2+2?")], {"answer": "4"})]


def test_bad_records_are_named_by_file_and_row(tmp_path: Path) -> None:
    rows = [CHATS[0], {"messages": [{"role": "human", "content": "hi"}]}]
    parquet = _write(rows, tmp_path / "c.parquet")
    with pytest.raises(ValueError, match=r"c\.parquet: row 1: messages\[0\] has role 'human'"):
        read_chatml(parquet)
    assert "c.parquet: row 1: not chatml data" in str(sniff("chatml", parquet))
    jsonl = _write(rows, tmp_path / "c.jsonl")  # JSON: the line, whoever wrote the file
    with pytest.raises(ValueError, match=r"c\.jsonl:2: messages\[0\] has role 'human'"):
        read_chatml(jsonl)


def test_text_column(tmp_path: Path) -> None:
    path = _write([{"text": "one\n\ntwo"}, {"text": "three"}], tmp_path / "t.parquet")
    assert read_texts(path) == ["one\n\ntwo", "three"]
    assert sniff("text", path) is None
    assert "missing key 'text'" in str(sniff("text", _write(CHATS, tmp_path / "c.parquet")))


def test_the_held_out_hh_pairs_read_from_parquet(data_dir: Path, tmp_path: Path) -> None:
    """The repo's real HH-RLHF slice, converted by `datasets` to parquet: the same 1,794 pairs
    and the same skipped records (now named by row) as the JSON lines file."""
    jsonl = data_dir / "hh_rlhf_harmless.jsonl"
    want, skipped = read_hh_rlhf_report(jsonl)
    parquet = tmp_path / "hh.parquet"
    datasets.load_dataset("json", data_files=str(jsonl), split="train").to_parquet(str(parquet))
    got, got_skipped = read_hh_rlhf_report(parquet)
    assert got == want and len(got) == 1794
    assert got_skipped == {reason: [line - 1 for line in lines] for reason, lines in skipped.items()}
    assert detect_format(parquet) == "hh_rlhf"


def test_a_path_that_is_not_here_is_refused_with_how_to_download(tmp_path: Path) -> None:
    from launcher.cli import preflight

    why = missing_path_problem("Anthropic/hh-rlhf")
    assert why is not None and "save_to_disk" in why and "load_dataset('Anthropic/hh-rlhf'" in why
    _, errors = preflight(["stage=dpo", "data=preference", "data.path=Anthropic/hh-rlhf",
                           f"run.dir={tmp_path / 'run'}"], multirun=False)
    assert len(errors) == 1 and errors[0].startswith("data.path=Anthropic/hh-rlhf: ") and "never downloads" in errors[0]
    saved = _write(CHATS, tmp_path / "saved")
    _, errors = preflight(["stage=dpo", "data.format=auto", f"data.path={saved}",
                           f"run.dir={tmp_path / 'run'}"], multirun=False)
    assert errors == [f"data.path={saved}: data.format=auto: its records are chatml data, and stage=dpo "
                      f"reads one of embedded, hh_rlhf, preference, auto"]
    _, errors = preflight(["stage=sft", "data.format=auto", f"data.path={saved}",
                           f"run.dir={tmp_path / 'run'}"], multirun=False)
    assert errors == []


def test_the_launcher_reads_data_sets_without_torch(tmp_path: Path) -> None:
    path, saved = _write(CHATS, tmp_path / "c.parquet"), _write(CHATS, tmp_path / "saved")
    csv = _write([{"prompt": "2+2?", "chosen": "4", "rejected": "5"}], tmp_path / "p.csv")
    code = ("import sys, os; from launcher.validate import _check_paths; "
            "from trainer.data.readers import detect_format, sniff; "
            f"assert sniff('chatml', {str(path)!r}) is None and sniff('chatml', {str(saved)!r}) is None; "
            f"assert sniff('preference', {str(csv)!r}) is None and detect_format({str(saved)!r}) == 'chatml'; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert os.environ['HF_DATASETS_OFFLINE'] == '1'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def _cfg(fmt: str, path: Path, columns: dict[str, str] | None = None) -> Any:
    data: dict[str, Any] = {"format": fmt, "path": str(path), "embedded": {}}
    if columns:
        data["columns"] = columns
    return OmegaConf.create({"data": data})


def test_json_file_written_by_hand_still_reads(tmp_path: Path) -> None:
    """chatforge's own JSON lines (blank lines, mixed prompt types in one column) read as before."""
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([json.dumps({"prompt": "a"}), "", json.dumps(
        {"prompt": [{"role": "user", "content": "b"}]})]) + "\n")
    assert [p for p, _ in read_prompts(path)] == [[Message("user", "a")], [Message("user", "b")]]


def test_pretraining_text_from_a_data_set(tmp_path: Path) -> None:
    """format=text with a data set (its `body` column mapped to text): one document a row,
    tokenized into the indexed file, and reused on a resume (the done-marker)."""
    from chatforge_config.trainer import Config
    from trainer.data.corpus import generate_corpus
    from trainer.data.indexed import IndexedTokens
    from trainer.data.prepare import prepare_pretrain_data

    docs = generate_corpus(59, 0) + ["A first paragraph.\n\nA second one, same document."]
    path = _write([{"body": doc} for doc in docs], tmp_path / "t.parquet")
    cfg = OmegaConf.structured(Config)
    cfg.tokenizer.vocab_size = 400
    OmegaConf.update(cfg, "data.format", "text")
    OmegaConf.update(cfg, "data.path", str(path))
    OmegaConf.update(cfg, "data.columns.text", "body")
    prep = prepare_pretrain_data(cfg, tmp_path / "run")
    assert IndexedTokens(prep.prefix).num_docs == len(docs) == 60  # blank lines in a row split nothing
    mtime = (tmp_path / "run" / "data" / "train.bin").stat().st_mtime_ns
    prepare_pretrain_data(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "data" / "train.bin").stat().st_mtime_ns == mtime
    OmegaConf.update(cfg, "data.columns.text", "other")
    with pytest.raises(ValueError, match=r"data\.columns\.text: 'body' -> 'other'"):
        prepare_pretrain_data(cfg, tmp_path / "run")
