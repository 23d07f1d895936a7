"""The tokenizer backends for imported models (trainer/data/tokenizer.py): a Hugging Face
tokenizer.json and a Llama-style sentencepiece model, with the chat pieces appended."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from trainer.data.tokenizer_training import train_tokenizer
from trainer.data.tokenizer import tokenizer_of
from trainer.data.corpus import generate_corpus
from trainer.data.tokenizer import (IM_END, IM_START, HFTokenizer, SentencePieceTokenizer, Tokenizer,
                                    add_chat_pieces, canonical_name, find_tokenizer)

TEXT = "Ada has 12 apples.\nShe gives  3 to Ben: how many are left?"


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return [line for doc in generate_corpus(40, 0) for line in doc.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def gpt2_json(lines: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 style byte-level BPE tokenizer.json with <|endoftext|> and no chat pieces."""
    from tokenizers import Tokenizer as Rust
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Rust(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("gpt2") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def llama_spm(lines: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sentencepiece model with Llama's settings: <unk> <s> </s>, dummy prefix, no pad."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=400, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2, num_threads=1)
    path = tmp_path_factory.mktemp("llama") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


def test_tokenizer_json_backend(gpt2_json: Path) -> None:
    tok = Tokenizer(gpt2_json)
    assert isinstance(tok, HFTokenizer) and tok.path == gpt2_json
    assert tok.id_to_piece(tok.eod_id) == "<|endoftext|>" and tok.pad_id == tok.eod_id  # no pad piece
    assert tok.vocab_size == 300
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and len(ids) < len(TEXT)
    assert tok.encode_batch([TEXT, "x"]) == [ids, tok.encode("x")]
    assert tok.decode(ids + [tok.eod_id]) == TEXT  # EOD decodes to nothing
    assert tok.chat_id(IM_START) is None
    with pytest.raises(ValueError, match=r"no <\|im_start\|> piece.*hf_import"):
        _ = tok.im_start_id


def test_chat_pieces_appended_to_tokenizer_json(gpt2_json: Path, tmp_path: Path) -> None:
    dest = tmp_path / "tokenizer.json"
    assert add_chat_pieces(gpt2_json, dest) == [IM_START, IM_END]
    old, new = Tokenizer(gpt2_json), Tokenizer(dest)
    assert (new.vocab_size, new.im_start_id, new.im_end_id) == (302, 300, 301)
    assert new.encode(TEXT) == old.encode(TEXT)  # every old id keeps its meaning
    ids = new.encode(f"{IM_START}user\n{TEXT}{IM_END}\n")
    assert ids[0] == 300 and 301 in ids and new.decode(ids) == f"{IM_START}user\n{TEXT}{IM_END}\n"
    assert add_chat_pieces(dest, tmp_path / "again" / "tokenizer.json") == []


def test_llama_sentencepiece_gets_chat_pieces(llama_spm: Path, tmp_path: Path) -> None:
    dest = tmp_path / "tokenizer.model"
    assert add_chat_pieces(llama_spm, dest) == [IM_START, IM_END]
    old, new = Tokenizer(llama_spm), Tokenizer(dest)
    assert isinstance(new, SentencePieceTokenizer)
    assert (old.eod_id, old.pad_id, new.vocab_size) == (2, 2, 402)  # </s>; pad falls back to it
    assert [new.id_to_piece(i) for i in range(400)] == [old.id_to_piece(i) for i in range(400)]
    assert (new.im_start_id, new.im_end_id) == (400, 401)
    # No dummy prefix: a segment encoded alone starts with its own first piece, as the chat
    # format's per-segment encoding needs (the old model put a lone "▁" first).
    assert old.id_to_piece(old.encode("user")[0]).startswith("▁")
    assert new.encode(f"{IM_START}user\n")[:2] == [400, new.encode("user\n")[0]]
    assert not new.id_to_piece(new.encode("user")[0]).startswith("▁")
    assert new.decode(new.encode(TEXT)) == TEXT


def test_our_own_tokenizer_needs_nothing(lines: list[str], tmp_path: Path) -> None:
    model = Path(train_tokenizer(tmp_path / "ours", 400, texts=lines, num_threads=1))
    assert add_chat_pieces(model, tmp_path / "copy" / "tokenizer.model") == []
    assert Tokenizer(tmp_path / "copy" / "tokenizer.model").encode(TEXT) == Tokenizer(model).encode(TEXT)


def test_files_are_found_by_either_name(gpt2_json: Path, tmp_path: Path) -> None:
    assert canonical_name(gpt2_json) == "tokenizer.json" and canonical_name("x/spm.model") == "tokenizer.model"
    step = tmp_path / "run" / "checkpoints" / "step_000003"
    step.mkdir(parents=True)
    assert find_tokenizer(step) is None
    run_tok = tmp_path / "run" / "tokenizer" / "tokenizer.json"
    run_tok.parent.mkdir()
    run_tok.write_bytes(gpt2_json.read_bytes())
    assert tokenizer_of(step) == run_tok  # the run's copy when the checkpoint has none
    (step / "tokenizer.json").write_bytes(gpt2_json.read_bytes())
    assert tokenizer_of(step) == step / "tokenizer.json"


def test_bad_tokenizer_json_is_named(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizer.json"):
        Tokenizer(path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Tokenizer(tmp_path / "missing.json")
