"""A sentencepiece tokenizer with the chat format's special tokens.

The special pieces (and the ids tools/tokenizer.py gives them when it trains a model):

    0  <|pad|>         padding; never a training target
    1  <unk>           sentencepiece requires one; byte fallback means it is never produced
    2  <|endoftext|>   end of document (EOD), sentencepiece's eos; a control symbol, so the
                       literal string in user text does NOT become EOD (no injection)
    3  <|im_start|>    chat turn start; a user-defined symbol, so the literal string in text
    4  <|im_end|>      encodes to this single id (the chat templates rely on that)

There is no BOS: documents are separated by EOD only (GPT-2 / Megatron convention).
A user's own .model (tokenizer.path) needs an eos; pad falls back to eos when absent, and the
chat ids are only demanded when chat formatting asks for them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import sentencepiece as spm

PAD_PIECE = "<|pad|>"
UNK_PIECE = "<unk>"
EOD_PIECE = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Pieces encoded from literal text (sentencepiece user_defined_symbols), in id order.
CHAT_PIECES: tuple[str, ...] = (IM_START, IM_END)
# pad, unk, eod, then the chat pieces: ids 0..4 in a tokenizer trained by tools/tokenizer.py.
NUM_SPECIAL: int = 3 + len(CHAT_PIECES)


class Tokenizer:
    """Encode/decode text with a sentencepiece model; no BOS/EOS are added implicitly."""

    def __init__(self, model_path: str | Path) -> None:
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{self.path} is not a valid sentencepiece model: {err}") from err
        self.eod_id: int = self._sp.eos_id()
        if self.eod_id < 0:
            raise ValueError(
                f"tokenizer {self.path} has no eos piece; it is needed as the end-of-document token"
            )
        pad = self._sp.pad_id()
        # Padding is always masked out of losses, so any id works; eod keeps the vocab unchanged.
        self.pad_id: int = pad if pad >= 0 else self.eod_id
        self._chat_ids = {piece: self._optional_id(piece) for piece in CHAT_PIECES}

    def _optional_id(self, piece: str) -> int | None:
        idx = self._sp.piece_to_id(piece)
        # piece_to_id answers unk for unknown pieces rather than failing.
        return None if idx == self._sp.unk_id() else int(idx)

    def _chat_id(self, piece: str) -> int:
        idx = self._chat_ids[piece]
        if idx is None:
            raise ValueError(
                f"tokenizer {self.path} has no {piece} piece; train one with tools/tokenizer.py "
                "(or leave tokenizer.path empty) to use the chat format"
            )
        return idx

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def im_start_id(self) -> int:
        return self._chat_id(IM_START)

    @property
    def im_end_id(self) -> int:
        return self._chat_id(IM_END)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; `<|im_start|>`/`<|im_end|>` inside it become their single ids."""
        return list(self._sp.encode(text, out_type=int))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Like encode for many texts; sentencepiece spreads the batch over threads."""
        return [list(ids) for ids in self._sp.encode(list(texts), out_type=int)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control ids (pad, EOD) decode to nothing."""
        return str(self._sp.decode([int(i) for i in ids]))

    def id_to_piece(self, idx: int) -> str:
        return str(self._sp.id_to_piece(int(idx)))
