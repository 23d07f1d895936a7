"""Tokenizer training (trainer/data/tokenizer_training.py; its command tools/tokenizer.py) and
the Tokenizer wrapper on real text."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import DATA
from tools.tokenizer import main
from trainer.data.tokenizer import EOD_PIECE, IM_END, IM_START, MIN_VOCAB_SIZE, PAD_PIECE, Tokenizer
from trainer.data.tokenizer_training import train_tokenizer

SHAKESPEARE = DATA / "tinyshakespeare.txt"


def _lines(start: int, stop: int) -> list[str]:
    return SHAKESPEARE.read_text(encoding="utf-8").splitlines()[start:stop]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "slice.txt"
    path.write_text("\n".join(_lines(0, 2000)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_path(train_file: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("tok") / "shakespeare"
    return train_tokenizer(out, 512, files=[train_file])


@pytest.fixture(scope="module")
def tok(model_path: str) -> Tokenizer:
    return Tokenizer(model_path)


def test_round_trip_on_unseen_text(tok: Tokenizer) -> None:
    text = "\n".join(_lines(2000, 2300))
    ids = tok.encode(text)
    assert len(ids) < len(text)  # it learned merges, not just bytes
    assert tok.decode(ids) == text


def test_whitespace_and_unicode_round_trip(tok: Tokenizer) -> None:
    # Byte fallback and identity normalization: nothing is lost or squashed.
    text = "  two  spaces\tand a tab\nnaïve café 🙂 中文 12345\n\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok._sp.unk_id() not in ids


def test_vocab_and_special_ids(tok: Tokenizer) -> None:
    assert tok.vocab_size == 512
    assert (tok.pad_id, tok.eod_id, tok.im_start_id, tok.im_end_id) == (0, 2, 3, 4)
    assert tok.id_to_piece(tok.pad_id) == PAD_PIECE
    assert tok.id_to_piece(tok.eod_id) == EOD_PIECE
    assert tok.id_to_piece(tok.im_start_id) == IM_START
    assert tok.id_to_piece(tok.im_end_id) == IM_END


def test_chat_markers_encode_to_single_ids(tok: Tokenizer) -> None:
    text = f"{IM_START}user\nWhat is 2 plus 3?{IM_END}\n{IM_START}assistant\n5{IM_END}"
    ids = tok.encode(text)
    assert ids[0] == tok.im_start_id
    assert ids.count(tok.im_start_id) == 2
    assert ids.count(tok.im_end_id) == 2
    assert tok.decode(ids) == text


def test_no_implicit_bos_eos_and_eod_is_not_injectable(tok: Tokenizer) -> None:
    assert tok.eod_id not in tok.encode("To be, or not to be")
    # The literal EOD string in user text stays text: documents cannot be split from inside.
    ids = tok.encode(f"a {EOD_PIECE} b")
    assert tok.eod_id not in ids
    assert tok.decode(ids) == f"a {EOD_PIECE} b"
    assert tok.decode([tok.eod_id, tok.pad_id]) == ""


def test_training_is_deterministic(train_file: Path, model_path: str, tmp_path: Path) -> None:
    again = train_tokenizer(tmp_path / "again", 512, files=[train_file])
    assert Path(again).read_bytes() == Path(model_path).read_bytes()


def test_train_from_texts_and_unigram(tmp_path: Path) -> None:
    path = train_tokenizer(tmp_path / "uni", 400, texts=["\n".join(_lines(0, 1500))], model_type="unigram")
    tok = Tokenizer(path)
    assert tok.vocab_size == 400
    assert tok.im_start_id == 3 and tok.encode(IM_END) == [tok.im_end_id]
    assert not list(tmp_path.glob("*.tmp-*"))  # written under temporary names, then renamed


def test_missing_input_names_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_tokenizer(tmp_path / "t", 512, files=[missing])


def test_vocab_too_small_names_key_and_value(train_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tokenizer\.vocab_size=100\b"):
        train_tokenizer(tmp_path / "t", 100, files=[train_file])
    # Big enough for the specials but not for the corpus' characters: still names the key.
    with pytest.raises(ValueError, match=rf"tokenizer\.vocab_size={MIN_VOCAB_SIZE}\b"):
        train_tokenizer(tmp_path / "t", MIN_VOCAB_SIZE, files=[train_file])


def test_bad_model_type_names_key(train_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer.model_type='wordpiece'"):
        train_tokenizer(tmp_path / "t", 512, files=[train_file], model_type="wordpiece")


def test_tokenizer_missing_model_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")


def test_cli_prints_model_path(train_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli" / "tok"
    main(["--input", str(train_file), "--out", str(out), "--vocab-size", "384", "--model-type", "bpe"])
    printed = capsys.readouterr().out.strip()
    assert printed == f"{out}.model"
    assert Tokenizer(printed).vocab_size == 384
