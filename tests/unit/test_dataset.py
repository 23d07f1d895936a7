"""SequenceDataset, SampleLoader and split_documents (trainer/data/gpt_dataset.py), and the
run-directory data preparation (trainer/data/prepare.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from chatforge_config.trainer import Config
from trainer.data.gpt_dataset import SampleLoader, SequenceDataset, split_documents
from trainer.data.indexed import IndexedTokens, write_indexed
from trainer.data.prepare import load_prepared, prepare_pretrain_data
from trainer.data.tokenizer import Tokenizer

SEQ = 16


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> IndexedTokens:
    """Documents whose tokens are their global positions: every token is unique, so a
    window's provenance can be read off its values."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=120)
    lengths[5] = 0
    starts = np.concatenate(([0], np.cumsum(lengths)))
    docs = [list(range(starts[i], starts[i + 1])) for i in range(len(lengths))]
    prefix = tmp_path_factory.mktemp("ds") / "pos"
    write_indexed(prefix, docs, vocab_size=65535)
    return IndexedTokens(prefix)


def _subset() -> np.ndarray:
    return np.arange(0, 120, 2)  # every other document: the dataset must stay inside it


def test_windows_are_contiguous_pieces_of_shuffled_documents(tokens: IndexedTokens) -> None:
    ds = SequenceDataset(tokens, _subset(), SEQ, seed=7)
    offsets = tokens.doc_offsets
    allowed = np.concatenate([np.arange(offsets[d], offsets[d + 1]) for d in _subset()])
    doc_ends = set((offsets[1:] - 1).tolist())
    doc_starts = set(offsets[:-1].tolist())
    assert len(ds) == (allowed.size - 1) // SEQ
    seen: set[int] = set()
    for i in range(len(ds)):
        s = ds.sample(i)
        assert s.dtype == np.int64 and s.shape == (SEQ + 1,)
        for a, b in zip(s[:-1].tolist(), s[1:].tolist()):
            # Inside a document tokens follow on; at its end the next document starts.
            assert b == a + 1 or (a in doc_ends and b in doc_starts)
        seen.update(s.tolist())
    # One epoch covers all but the dropped tail, windows sharing only their boundary token.
    assert seen <= set(allowed.tolist())
    assert len(seen) == len(ds) * SEQ + 1


def test_same_seed_same_samples_other_seed_or_epoch_differs(tokens: IndexedTokens) -> None:
    a = SequenceDataset(tokens, _subset(), SEQ, seed=1)
    b = SequenceDataset(tokens, _subset(), SEQ, seed=1)
    c = SequenceDataset(tokens, _subset(), SEQ, seed=2)
    n = len(a)
    first = np.stack([a.sample(i) for i in range(n)])
    assert np.array_equal(first, np.stack([b.sample(i) for i in range(n)]))
    assert not np.array_equal(first, np.stack([c.sample(i) for i in range(n)]))
    # Epoch 1 reshuffles; indices far ahead work and are reproducible out of order.
    assert not np.array_equal(first, np.stack([a.sample(n + i) for i in range(n)]))
    assert np.array_equal(a.sample(50 * n + 3), b.sample(50 * n + 3))


def test_seq_length_too_long_names_key(tokens: IndexedTokens) -> None:
    with pytest.raises(ValueError, match=r"model\.seq_length=4096"):
        SequenceDataset(tokens, [0, 1], 4096, seed=0)


def _loader(tokens: IndexedTokens, seed: int = 3, **kw: int) -> SampleLoader:
    args = {"global_batch": 8, "micro_batch": 2, "dp_rank": 0, "dp_size": 1, "consumed_samples": 0}
    args.update(kw)
    return SampleLoader(SequenceDataset(tokens, _subset(), SEQ, seed=seed), **args)


def _step_tokens(batch: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([mb["tokens"] for mb in batch])


def test_loader_shapes_and_determinism(tokens: IndexedTokens) -> None:
    loader = _loader(tokens)
    batch = next(loader)
    assert len(batch) == 4 and loader.num_microbatches == 4
    assert all(mb["tokens"].shape == (2, SEQ + 1) and mb["tokens"].dtype == torch.long for mb in batch)
    assert loader.position == loader.consumed_samples == 8
    again = next(_loader(tokens))
    assert torch.equal(_step_tokens(batch), _step_tokens(again))
    assert not torch.equal(_step_tokens(batch), _step_tokens(next(_loader(tokens, seed=4))))


def test_resume_from_state_gives_the_same_next_batches(tokens: IndexedTokens) -> None:
    loader = _loader(tokens)
    for _ in range(3):
        next(loader)
    state = loader.state_dict()
    assert state == {"consumed_samples": 24}
    expected = [_step_tokens(next(loader)) for _ in range(40)]  # runs past the epoch end
    resumed = _loader(tokens)
    resumed.load_state_dict(state)
    assert all(torch.equal(_step_tokens(next(resumed)), e) for e in expected)
    direct = _loader(tokens, consumed_samples=24)
    assert torch.equal(_step_tokens(next(direct)), expected[0])


@pytest.mark.parametrize("dp_size, micro", [(2, 2), (4, 1), (2, 4)])
def test_dp_slices_union_is_the_single_process_batch(tokens: IndexedTokens, dp_size: int, micro: int) -> None:
    single = _loader(tokens, micro_batch=2)
    ranks = [_loader(tokens, micro_batch=micro, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    for _ in range(5):
        whole = _step_tokens(next(single))
        parts = torch.cat([_step_tokens(next(r)) for r in ranks])
        assert torch.equal(whole, parts)
        assert all(len(r.state_dict()) == 1 and r.consumed_samples == single.consumed_samples for r in ranks)


def test_batch_divisibility_error_names_keys(tokens: IndexedTokens) -> None:
    with pytest.raises(ValueError, match=r"train\.global_batch=10 .*train\.micro_batch=2 .* 2 = 4"):
        _loader(tokens, global_batch=10, micro_batch=2, dp_size=2)
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, 2\)"):
        _loader(tokens, dp_rank=2, dp_size=2)


def test_split_documents() -> None:
    train, evals = split_documents(100, 0.1, seed=0)
    assert evals.size == 10 and train.size == 90
    assert sorted(np.concatenate([train, evals]).tolist()) == list(range(100))
    assert np.array_equal(evals, split_documents(100, 0.1, seed=0)[1])
    assert not np.array_equal(evals, split_documents(100, 0.1, seed=1)[1])
    assert [a.size for a in split_documents(2, 0.0, seed=0)] == [1, 1]  # eval never empty
    assert [a.size for a in split_documents(1, 0.5, seed=0)] == [1, 0]
    with pytest.raises(ValueError, match=r"data\.eval_fraction=1\.0"):
        split_documents(10, 1.0, seed=0)


# ---- run-directory preparation -----------------------------------------------------------

def _cfg(**overrides: object) -> DictConfig:
    cfg = OmegaConf.structured(Config)
    cfg.data.embedded.num_docs = 150
    cfg.tokenizer.vocab_size = 400
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_prepare_embedded_then_resume_reuses(tmp_path: Path) -> None:
    cfg = _cfg()
    prep = prepare_pretrain_data(cfg, tmp_path)
    assert prep.tokenizer_path == tmp_path / "tokenizer" / "tokenizer.model"
    assert (tmp_path / "data" / "corpus.txt").is_file()
    tokens = IndexedTokens(prep.prefix)
    assert tokens.num_docs == 150 and prep.vocab_size == Tokenizer(prep.tokenizer_path).vocab_size == 400
    assert prep.eval_docs.size == 8 and prep.train_docs.size == 142  # round(150 * 0.05)
    assert set(prep.train_docs.tolist()).isdisjoint(prep.eval_docs.tolist())
    mtime = (tmp_path / "data" / "train.bin").stat().st_mtime_ns
    again = prepare_pretrain_data(cfg, tmp_path)
    assert (tmp_path / "data" / "train.bin").stat().st_mtime_ns == mtime  # reused, not redone
    other = load_prepared(cfg, tmp_path)
    for p in (again, other):
        assert p.prefix == prep.prefix and np.array_equal(p.eval_docs, prep.eval_docs)
    SequenceDataset(tokens, prep.train_docs, 128, seed=0).sample(0)  # enough text for a window


def test_prepare_refuses_changed_data_settings(tmp_path: Path) -> None:
    prepare_pretrain_data(_cfg(), tmp_path)
    with pytest.raises(ValueError, match=r"data\.embedded\.num_docs: 150 -> 151"):
        prepare_pretrain_data(_cfg(**{"data.embedded.num_docs": 151}), tmp_path)


def test_prepare_text_files_and_existing_tokenizer(tmp_path: Path) -> None:
    text = tmp_path / "a.txt"
    text.write_text("one para\nstill one\n\nsecond para\n\nthird\n", encoding="utf-8")
    first = prepare_pretrain_data(_cfg(), tmp_path / "run1")
    cfg = _cfg(**{"data.format": "text", "data.path": f"{text}, {text}",
                  "tokenizer.path": str(first.tokenizer_path)})
    prep = prepare_pretrain_data(cfg, tmp_path / "run2")
    assert prep.tokenizer_path == first.tokenizer_path
    assert not (tmp_path / "run2" / "tokenizer").exists()
    assert IndexedTokens(prep.prefix).num_docs == 6
    record = json.loads((tmp_path / "run2" / "data" / "prepared.json").read_text())
    assert record["num_docs"] == 6 and record["eval_docs"] == 1


def test_prepare_errors_name_keys(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.path: .*missing\.txt"):
        prepare_pretrain_data(_cfg(**{"data.format": "text", "data.path": str(tmp_path / "missing.txt")}), tmp_path)
    with pytest.raises(ValueError, match=r"data\.path is empty"):
        prepare_pretrain_data(_cfg(**{"data.format": "text"}), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.path: .*nope\.model"):
        prepare_pretrain_data(_cfg(**{"tokenizer.path": str(tmp_path / "nope.model")}), tmp_path)
    with pytest.raises(ValueError, match=r"data\.format='chatml'"):
        prepare_pretrain_data(_cfg(**{"data.format": "chatml"}), tmp_path)
    with pytest.raises(FileNotFoundError, match="prepared.json"):
        load_prepared(_cfg(), tmp_path / "never")
