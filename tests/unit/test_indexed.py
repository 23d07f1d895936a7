"""The indexed token format (trainer/data/indexed.py) and text preprocessing
(trainer/data/preprocess.py; its command tools/preprocess.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DATA
from tools.preprocess import main
from trainer.data.indexed import IndexedTokens, indexed_exists, write_indexed
from trainer.data.preprocess import iter_documents, preprocess_text
from trainer.data.tokenizer import Tokenizer
from trainer.data.tokenizer_training import train_tokenizer

SHAKESPEARE = DATA / "tinyshakespeare.txt"


def _docs(seed: int, n: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, size=rng.integers(1, 50)).tolist() for _ in range(n)]
    docs[3] = []  # empty documents are legal and keep their slot
    return docs


def test_round_trip_uint16(tmp_path: Path) -> None:
    docs = _docs(0, 40, 512)
    write_indexed(tmp_path / "t", docs, vocab_size=512)
    idx = IndexedTokens(tmp_path / "t")
    assert idx.num_docs == 40
    assert idx.num_tokens == sum(len(d) for d in docs)
    assert idx.dtype == np.uint16
    assert (tmp_path / "t.bin").stat().st_size == 2 * idx.num_tokens
    assert idx.doc_lengths.tolist() == [len(d) for d in docs]
    for i, d in enumerate(docs):
        assert idx.doc(i).tolist() == d
    assert idx.tokens(0, idx.num_tokens).tolist() == [t for d in docs for t in d]


def test_large_vocab_uses_int32(tmp_path: Path) -> None:
    docs = [[0, 65535, 65536, 99_999], [70_000]]
    write_indexed(tmp_path / "big", docs, vocab_size=100_000)
    idx = IndexedTokens(tmp_path / "big")
    assert idx.dtype == np.int32
    assert [idx.doc(0).tolist(), idx.doc(1).tolist()] == docs


def test_out_of_range_token_rejected_and_nothing_left(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"document 1 has token ids outside \[0, 10\)"):
        write_indexed(tmp_path / "bad", [[1, 2], [3, 10]], vocab_size=10)
    assert not indexed_exists(tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []  # temporary files were cleaned up


def test_overwrite_is_complete(tmp_path: Path) -> None:
    write_indexed(tmp_path / "t", _docs(0, 40, 512), vocab_size=512)
    write_indexed(tmp_path / "t", [[7, 8, 9]], vocab_size=512)
    idx = IndexedTokens(tmp_path / "t")
    assert (idx.num_docs, idx.doc(0).tolist()) == (1, [7, 8, 9])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin", "t.idx.npy", "t.json"]


def test_truncated_bin_names_file(tmp_path: Path) -> None:
    write_indexed(tmp_path / "t", _docs(1, 20, 512), vocab_size=512)
    data = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data[:-4])
    with pytest.raises(ValueError, match=r"t\.bin is corrupt"):
        IndexedTokens(tmp_path / "t")


def test_index_mismatch_names_file(tmp_path: Path) -> None:
    write_indexed(tmp_path / "t", _docs(1, 20, 512), vocab_size=512)
    meta = json.loads((tmp_path / "t.json").read_text())
    meta["num_docs"] = 21
    (tmp_path / "t.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"t\.idx\.npy is corrupt"):
        IndexedTokens(tmp_path / "t")


def test_missing_sidecar_names_file(tmp_path: Path) -> None:
    write_indexed(tmp_path / "t", [[1, 2, 3]], vocab_size=512)
    (tmp_path / "t.json").unlink()  # what an interrupted write leaves behind
    assert not indexed_exists(tmp_path / "t")
    with pytest.raises(FileNotFoundError, match=r"t\.json"):
        IndexedTokens(tmp_path / "t")


def test_doc_index_out_of_range(tmp_path: Path) -> None:
    write_indexed(tmp_path / "t", [[1], [2]], vocab_size=512)
    with pytest.raises(IndexError, match="document 2 out of range"):
        IndexedTokens(tmp_path / "t").doc(2)


# ---- preprocessing -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    lines = SHAKESPEARE.read_text(encoding="utf-8").splitlines()[:1000]
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "t", 400, texts=lines)


def test_paragraphs_become_documents_ended_by_eod(tok_path: str, tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    a.write_text("First Citizen:\nBefore we proceed.\n\n\n  \nAll:\nSpeak, speak.\n", encoding="utf-8")
    b = tmp_path / "b.txt"
    b.write_text("\n\nThird para,\nlast one, no newline at end", encoding="utf-8")
    paragraphs = ["First Citizen:\nBefore we proceed.", "All:\nSpeak, speak.",
                  "Third para,\nlast one, no newline at end"]
    assert list(iter_documents([a, b])) == paragraphs
    stats = preprocess_text([a, b], tok_path, tmp_path / "out")
    tok = Tokenizer(tok_path)
    idx = IndexedTokens(tmp_path / "out")
    assert (stats.num_docs, stats.num_tokens) == (3, idx.num_tokens)
    for i, para in enumerate(paragraphs):
        doc = idx.doc(i).tolist()
        assert doc[-1] == tok.eod_id and tok.eod_id not in doc[:-1]
        assert tok.decode(doc[:-1]) == para


def test_preprocess_errors_name_the_file(tok_path: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        preprocess_text([tmp_path / "absent.txt"], tok_path, tmp_path / "out")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n\n")
    with pytest.raises(ValueError, match="blank.txt"):
        preprocess_text([blank], tok_path, tmp_path / "out")
    assert not indexed_exists(tmp_path / "out")


def test_preprocess_cli_on_shakespeare(tok_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--input", str(SHAKESPEARE), "--tokenizer", tok_path, "--out", str(tmp_path / "ts")])
    stats = json.loads(capsys.readouterr().out)
    idx = IndexedTokens(tmp_path / "ts")
    assert stats["num_docs"] == idx.num_docs > 5000  # speeches are separated by blank lines
    assert stats["num_tokens"] == idx.num_tokens
    assert (idx.doc_lengths >= 2).all()  # at least one token of text plus EOD
