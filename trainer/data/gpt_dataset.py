"""Pretraining samples: fixed-length windows over shuffled documents, and the loader that
deals them to data-parallel ranks.

Like Megatron's GPTDataset, an epoch concatenates the documents (EOD already ends each one)
in a seeded shuffled order and cuts it into windows of seq_length + 1 tokens with stride
seq_length (inputs are window[:-1], labels window[1:], so consecutive windows share one
token); the tail shorter than a window is dropped; the windows are then served in a seeded
shuffled order, so one batch mixes many parts of the corpus. Epoch e uses its own shuffles
seeded by (seed, e): sample i exists for every i >= 0 and depends only on (seed, i).

The loader is a pure function of `consumed_samples`: global step s reads the global samples
[s*G, (s+1)*G); data-parallel rank r takes the contiguous slice [r*G/dp, (r+1)*G/dp) and
splits it into microbatches in order. Hence the union over ranks of one step is exactly the
batch one process would read, whatever the parallel layout, and resuming needs only the
number of consumed samples.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from trainer.data.indexed import IndexedTokens

Batch = dict[str, torch.Tensor]
# Epoch layouts kept in memory: the current one and its neighbour (a step can straddle two).
_CACHED_EPOCHS = 2


def split_documents(num_docs: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of document indices -> (train, eval), each sorted int64.

    Eval gets round(num_docs * eval_fraction) documents, but at least one whenever
    num_docs >= 2 (so evaluation always has data) and never all of them.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction={eval_fraction} must be in [0, 1)")
    if num_docs < 1:
        raise ValueError(f"cannot split {num_docs} documents: the corpus is empty")
    n_eval = min(num_docs - 1, max(1, round(num_docs * eval_fraction))) if num_docs >= 2 else 0
    perm = np.random.default_rng([seed, num_docs]).permutation(num_docs)
    return np.sort(perm[n_eval:]).astype(np.int64), np.sort(perm[:n_eval]).astype(np.int64)


class SequenceDataset:
    """Windows of seq_length + 1 tokens over a subset of an IndexedTokens file."""

    def __init__(
        self, tokens: IndexedTokens, doc_indices: Sequence[int] | np.ndarray, seq_length: int, seed: int
    ) -> None:
        if seq_length < 1:
            raise ValueError(f"model.seq_length={seq_length} must be positive")
        docs = np.asarray(doc_indices, dtype=np.int64)
        if docs.ndim != 1 or docs.size == 0:
            raise ValueError(f"SequenceDataset needs a non-empty list of documents of {tokens.prefix}")
        if docs.min() < 0 or docs.max() >= tokens.num_docs:
            raise IndexError(f"document indices outside [0, {tokens.num_docs}) for {tokens.prefix}")
        self.tokens = tokens
        self.docs = docs
        self.seq_length = seq_length
        self.seed = seed
        self._lengths = tokens.doc_lengths
        total = int(self._lengths[docs].sum())
        # The last token of a window is only a label, and it is the first input of the next.
        self._num_samples = (total - 1) // seq_length
        if self._num_samples < 1:
            raise ValueError(
                f"model.seq_length={seq_length}: the {docs.size} documents hold {total} tokens, "
                f"fewer than one sample of seq_length + 1 = {seq_length + 1}; use more data or a "
                "shorter model.seq_length"
            )
        self.num_tokens = total
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        """Samples per epoch."""
        return self._num_samples

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order, its cumulative token starts, window order) of `epoch`."""
        if epoch in self._epochs:
            self._epochs.move_to_end(epoch)
            return self._epochs[epoch]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.docs)
        starts = np.concatenate(([0], np.cumsum(self._lengths[order])))
        windows = rng.permutation(self._num_samples)
        self._epochs[epoch] = (order, starts, windows)
        if len(self._epochs) > _CACHED_EPOCHS:
            self._epochs.popitem(last=False)
        return order, starts, windows

    def sample(self, i: int) -> np.ndarray:
        """Sample `i` (any i >= 0): int64 tokens of length seq_length + 1."""
        if i < 0:
            raise IndexError(f"sample index {i} must be >= 0")
        epoch, j = divmod(int(i), self._num_samples)
        order, starts, windows = self._epoch(epoch)
        start = int(windows[j]) * self.seq_length
        need = self.seq_length + 1
        out = np.empty(need, dtype=np.int64)
        k = int(np.searchsorted(starts, start, side="right")) - 1
        filled = 0
        while filled < need:
            doc = self.tokens.doc(int(order[k]))
            piece = doc[start + filled - int(starts[k]):][: need - filled]
            out[filled: filled + piece.size] = piece
            filled += piece.size
            k += 1
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        return self.sample(i)


class ArrayDataset:
    """Fixed samples (packed chats, preference pairs): row i of every array is sample i.
    Served like SequenceDataset: epoch e visits the rows in a permutation seeded by
    (seed, e), so sample i exists for every i >= 0 and depends only on (seed, i)."""

    def __init__(self, arrays: dict[str, np.ndarray], seed: int, what: str = "samples") -> None:
        sizes = {len(a) for a in arrays.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"no {what} to train on (sizes {sorted(sizes)}): check data.path and "
                             "model.seq_length")
        self.arrays = arrays
        self.seed = seed
        self._num = sizes.pop()
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return self._num

    def row(self, i: int) -> int:
        """The array row that sample `i` reads."""
        epoch, j = divmod(int(i), self._num)
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self._num)
            if len(self._orders) > _CACHED_EPOCHS:
                self._orders.popitem(last=False)
        return int(self._orders[epoch][j])

    def sample(self, i: int) -> dict[str, np.ndarray]:
        if i < 0:
            raise IndexError(f"sample index {i} must be >= 0")
        return self.item(self.row(i))

    def item(self, row: int) -> dict[str, np.ndarray]:
        """Array row `row`, with its index (which keys per-sample caches: DPO's reference)."""
        return {**{key: array[row] for key, array in self.arrays.items()}, "index": np.int64(row)}


def stack_samples(samples: list[Any]) -> Batch:
    """Token windows -> {"tokens"}; dict samples -> one stacked tensor per key."""
    if isinstance(samples[0], dict):
        # "tokens" first: the engine reads the microbatch size from the first tensor.
        keys = sorted(samples[0], key=lambda k: k != "tokens")
        return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in keys}
    return {"tokens": torch.from_numpy(np.stack(samples))}


class SampleLoader:
    """Deals each training step's global batch to this data-parallel rank as microbatches.
    `collate` turns a microbatch's samples into tensors (default: stack_samples)."""

    def __init__(
        self,
        dataset: Any,
        global_batch: int,
        micro_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
        collate: Callable[[list[Any]], Batch] = stack_samples,
    ) -> None:
        if micro_batch < 1 or global_batch < 1:
            raise ValueError(
                f"train.global_batch={global_batch} and train.micro_batch={micro_batch} must be positive"
            )
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} is not in [0, {dp_size})")
        if global_batch % (micro_batch * dp_size) != 0:
            raise ValueError(
                f"train.global_batch={global_batch} must be a multiple of train.micro_batch="
                f"{micro_batch} x data-parallel size {dp_size} = {micro_batch * dp_size}"
            )
        self.dataset = dataset
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_microbatches = global_batch // (micro_batch * dp_size)
        self.collate = collate
        self._consumed = 0
        self.load_state_dict({"consumed_samples": consumed_samples})

    @property
    def consumed_samples(self) -> int:
        """Global samples read by all ranks so far: the whole position of the loader."""
        return self._consumed

    @property
    def position(self) -> int:
        """Same as consumed_samples (the next step reads from here)."""
        return self._consumed

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"consumed_samples={consumed} must be >= 0")
        self._consumed = consumed

    def rank_sample_indices(self) -> np.ndarray:
        """Global sample indices this rank reads at the next step, in microbatch order."""
        per_rank = self.global_batch // self.dp_size
        first = self._consumed + self.dp_rank * per_rank
        return np.arange(first, first + per_rank, dtype=np.int64)

    def next_batch(self) -> list[Batch]:
        """This rank's microbatches for the next step, e.g. [{"tokens": [micro_batch, seq+1]}]."""
        samples = [self.dataset.sample(int(i)) for i in self.rank_sample_indices()]
        self._consumed += self.global_batch
        return [self.collate(samples[k:k + self.micro_batch])
                for k in range(0, len(samples), self.micro_batch)]

    def __iter__(self) -> Iterator[list[Batch]]:
        return self

    def __next__(self) -> list[Batch]:
        # Samples exist for every index (epochs repeat with fresh shuffles): never exhausted.
        return self.next_batch()
