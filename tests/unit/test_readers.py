"""Chat and preference data readers (trainer/data/readers.py): the real files in tests/data parse
completely, and malformed records are reported as `file:line: what is wrong`."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from trainer.data.chat import Message
from trainer.data.readers import (
    READERS,
    PreferencePair,
    read_alpaca,
    read_chatml,
    read_conversations,
    read_hh_rlhf,
    read_hh_rlhf_report,
    read_pairs,
    read_preference,
)

HH_LINES = 1800
# The odd records of the HH slice in tests/data (see the rule in readers.py's module doc).
HH_SKIPPED = {"empty_reply": [87, 517, 926, 1104], "prefix_mismatch": [1255, 1689]}


def _jsonl(path: Path, records: list[Any]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _chat(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def _hh(chosen: str, rejected: str) -> dict[str, str]:
    return {"chosen": chosen, "rejected": rejected}


# ---- the real files (tests/data) -----------------------------------------------------------------

def test_every_hh_line_parses(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = data_dir / "hh_rlhf_harmless.jsonl"
    assert len(path.read_text(encoding="utf-8").splitlines()) == HH_LINES
    pairs, skipped = read_hh_rlhf_report(path)
    assert skipped == HH_SKIPPED
    assert len(pairs) == HH_LINES - 6 == 1794
    for p in pairs:
        assert p.prompt[0].role == "user" and p.prompt[-1].role == "user"
        assert all(m.content and m.role in ("user", "assistant") for m in p.prompt)
        assert p.chosen and p.rejected and p.chosen != p.rejected
        assert "\n\nHuman:" not in p.chosen and "\n\nAssistant:" not in p.rejected
    with caplog.at_level(logging.WARNING, logger="trainer.data.readers"):
        assert read_hh_rlhf(path) == pairs
    assert "skipped 6 of 1800" in caplog.text and "1255" in caplog.text
    with pytest.raises(ValueError, match=r"hh_rlhf_harmless\.jsonl:87: .*empty"):
        read_hh_rlhf(path, strict=True)


def test_hh_first_pair_content(data_dir: Path) -> None:
    first = read_hh_rlhf(data_dir / "hh_rlhf_harmless.jsonl")[0]
    assert first.prompt[0] == Message("user", "what are some pranks with a pen i can do?")
    assert first.prompt[1] == Message("assistant", "Are you looking for practical joke ideas?")
    assert first.chosen.startswith("No, sorry!")


def test_every_alpaca_seed_task_parses(data_dir: Path) -> None:
    path = data_dir / "alpaca_seed_tasks.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    convs = read_alpaca(path)
    assert len(records) == 175
    assert len(convs) == sum(len(r["instances"]) for r in records) == 175
    assert all([m.role for m in c] == ["user", "assistant"] for c in convs)
    rec = records[1]  # has an input: it follows the instruction after a blank line
    assert convs[1][0].content == f"{rec['instruction']}\n\n{rec['instances'][0]['input']}"
    assert convs[0][0].content == records[0]["instruction"]  # empty input: instruction alone
    assert read_conversations("alpaca", path) == convs


def test_conversation_and_pair_dispatch(data_dir: Path) -> None:
    path = data_dir / "hh_rlhf_harmless.jsonl"
    pairs = read_pairs("hh_rlhf", path)
    convs = read_conversations("hh_rlhf", path)  # SFT on the chosen dialogues
    assert convs[0] == pairs[0].prompt + [Message("assistant", pairs[0].chosen)]
    assert set(READERS) == {"chatml", "alpaca", "hh_rlhf", "preference"}
    with pytest.raises(ValueError, match="data.format='alpaca'"):
        read_pairs("alpaca", path)
    with pytest.raises(ValueError, match="data.format='csv'"):
        read_conversations("csv", path)


# ---- chatml ---------------------------------------------------------------------------------

def test_chatml_reads_conversations(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "c.jsonl", [
        _chat(("system", "Be brief."), ("user", "hi"), ("assistant", "hello")),
        "",  # blank lines are skipped but still counted in line numbers
        _chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")),
    ])
    convs = read_chatml(path)
    assert len(convs) == 2 and convs[0][0] == Message("system", "Be brief.")
    assert read_conversations("chatml", path) == convs


@pytest.mark.parametrize("bad, message", [
    ('{"messages": [', r"c\.jsonl:3: invalid JSON"),
    ({"turns": []}, r"c\.jsonl:3: missing key 'messages'"),
    (_chat(("robot", "x"), ("assistant", "y")), r"c\.jsonl:3: messages\[0\] has role 'robot'"),
    (_chat(("user", ""), ("assistant", "y")), r"c\.jsonl:3: 'content' is empty"),
    ({"messages": [{"role": "user", "content": 5}]}, r"c\.jsonl:3: 'content' must be a string"),
    (_chat(("user", "x")), r"c\.jsonl:3: .*no assistant turn"),
    ([1, 2], r"c\.jsonl:3: expected a JSON object"),
])
def test_chatml_errors_name_file_and_line(tmp_path: Path, bad: Any, message: str) -> None:
    good = _chat(("user", "hi"), ("assistant", "hello"))
    path = _jsonl(tmp_path / "c.jsonl", [good, "", bad, good])
    with pytest.raises(ValueError, match=message):
        read_chatml(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_chatml(tmp_path / "nope.jsonl")


# ---- alpaca ---------------------------------------------------------------------------------

def test_alpaca_json_list_classic_form(tmp_path: Path) -> None:
    records = [
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "No input key.", "output": "fine"},
    ]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    convs = read_alpaca(path)
    assert [c[0].content for c in convs] == ["Say hi.", "Add.\n\n2 and 3", "No input key."]
    assert [c[1] for c in convs] == [Message("assistant", t) for t in ("hi", "5", "fine")]


def test_alpaca_errors_name_the_line_in_a_json_list(tmp_path: Path) -> None:
    good = {"instruction": "Say hi.", "input": "", "output": "hi"}
    path = tmp_path / "a.json"
    # indent=2: "[" on line 1, item k starts on line 2 + 5 * k (each item spans 5 lines).
    path.write_text(json.dumps([good, good, {"instruction": "x", "input": ""}], indent=2))
    with pytest.raises(ValueError, match=r"a\.json:12: missing key 'output'"):
        read_alpaca(path)
    path.write_text('[\n  {"instruction": "x",\n  "output": }\n]')
    with pytest.raises(ValueError, match=r"a\.json:3: invalid JSON"):
        read_alpaca(path)


def test_alpaca_seed_instance_errors(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "s.jsonl", [
        {"instruction": "x", "instances": [{"input": "", "output": "y"}]},
        {"instruction": "x", "instances": [{"input": "", "output": "y"}, {"input": 3, "output": "z"}]},
    ])
    with pytest.raises(ValueError, match=r"s\.jsonl:2: instances\[1\]: 'input' must be a string"):
        read_alpaca(path)
    _jsonl(path, [{"instruction": "x", "instances": []}])
    with pytest.raises(ValueError, match=r"s\.jsonl:1: 'instances' must be a non-empty list"):
        read_alpaca(path)


# ---- preference -----------------------------------------------------------------------------

def test_preference_string_and_message_prompts(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is 2 plus 2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "chosen": "Hello!", "rejected": "Go away."},
    ])
    pairs = read_preference(path)
    assert pairs[0] == PreferencePair([Message("user", "What is 2 plus 2?")], "4", "5")
    assert [m.role for m in pairs[1].prompt] == ["system", "user"]
    assert read_pairs("preference", path) == pairs


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "q", "chosen": "a"}, r"p\.jsonl:2: missing key 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, r"p\.jsonl:2: .*identical"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "chosen": "b", "rejected": "c"}, r"p\.jsonl:2: the prompt must end with a user turn"),
    ({"prompt": [{"role": "human", "content": "q"}], "chosen": "b", "rejected": "c"},
     r"p\.jsonl:2: prompt\[0\] has role 'human'"),
    ({"prompt": "q", "chosen": ["a"], "rejected": "c"}, r"p\.jsonl:2: expected a JSON object as the chosen\[0\]"),
])
def test_preference_errors(tmp_path: Path, bad: Any, message: str) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, bad])
    with pytest.raises(ValueError, match=message):
        read_preference(path)


# ---- HH-RLHF --------------------------------------------------------------------------------

PROMPT = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke."


def test_hh_parses_turns_and_shared_prefix(tmp_path: Path) -> None:
    good = _hh(PROMPT + "\n\nAssistant: A pun.", PROMPT + "\n\nAssistant: No.")
    path = _jsonl(tmp_path / "h.jsonl", [good])
    (pair,) = read_hh_rlhf(path)
    assert pair.prompt == [Message("user", "Hi there"), Message("assistant", "Hello!"),
                           Message("user", "Tell me a joke.")]
    assert (pair.chosen, pair.rejected) == ("A pun.", "No.")


@pytest.mark.parametrize("bad, message", [
    (_hh("Hi there, no turns at all", "x"), r"h\.jsonl:2: 'chosen' is not a dialogue"),
    (_hh(PROMPT, PROMPT + "\n\nAssistant: No."), r"h\.jsonl:2: 'chosen' does not end with an Assistant"),
    (_hh("\n\nAssistant: Hi", "\n\nAssistant: Ho"), r"h\.jsonl:2: 'chosen' does not start with a Human"),
    ({"chosen": PROMPT + "\n\nAssistant: A"}, r"h\.jsonl:2: missing key 'rejected'"),
    ("not json", r"h\.jsonl:2: invalid JSON"),
])
def test_hh_format_errors(tmp_path: Path, bad: Any, message: str) -> None:
    good = _hh(PROMPT + "\n\nAssistant: A pun.", PROMPT + "\n\nAssistant: No.")
    path = _jsonl(tmp_path / "h.jsonl", [good, bad])
    with pytest.raises(ValueError, match=message):
        read_hh_rlhf(path)


def test_hh_unusable_pairs_skip_or_raise(tmp_path: Path) -> None:
    good = _hh(PROMPT + "\n\nAssistant: A pun.", PROMPT + "\n\nAssistant: No.")
    other = "\n\nHuman: Something else entirely."
    path = _jsonl(tmp_path / "h.jsonl", [
        good,
        _hh(PROMPT + "\n\nAssistant: A pun.", other + "\n\nAssistant: No."),  # no shared prefix
        _hh(PROMPT + "\n\nAssistant: Same.", PROMPT + "\n\nAssistant: Same."),
        _hh(PROMPT + "\n\nAssistant: ", PROMPT + "\n\nAssistant: No."),
    ])
    pairs, skipped = read_hh_rlhf_report(path)
    assert len(pairs) == 1
    assert skipped == {"prefix_mismatch": [2], "identical": [3], "empty_reply": [4]}
    with pytest.raises(ValueError, match=r"h\.jsonl:2: .*do not share the dialogue"):
        read_hh_rlhf(path, strict=True)
