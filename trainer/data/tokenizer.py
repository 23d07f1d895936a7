"""Tokenizers with the chat format's special tokens: sentencepiece or a Hugging Face file.

`Tokenizer(path)` picks the backend by the file: `tokenizer.json` (the `tokenizers`
library's format, GPT-2 style byte-level BPE and most open models) or a sentencepiece
`.model` (ours, or a Llama-style `tokenizer.model`). Both offer the interface the stages
use: encode/decode, vocab_size, pad_id, eod_id, im_start_id, im_end_id, id_to_piece, path.

The special pieces (and the ids tokenizer_training.py gives them when it trains a model):

    0  <|pad|>         padding; never a training target
    1  <unk>           sentencepiece requires one; byte fallback means it is never produced
    2  <|endoftext|>   end of document (EOD), sentencepiece's eos; a control symbol, so the
                       literal string in user text does NOT become EOD (no injection)
    3  <|im_start|>    chat turn start; a user-defined symbol, so the literal string in text
    4  <|im_end|>      encodes to this single id (the chat templates rely on that)

There is no BOS: documents are separated by EOD only (GPT-2 / Megatron convention), and no
backend adds one. A user's own tokenizer needs an end-of-document token (sentencepiece's
eos; for tokenizer.json the first of EOD_NAMES it has); pad falls back to EOD when absent,
and the chat ids are only demanded when chat formatting asks for them. An imported
tokenizer gets the chat pieces appended by `add_chat_pieces` (tools/hf_import.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import sentencepiece as spm

from trainer.checkpoint_files import CheckpointError  # torch-free (the launcher reads tokenizers)

PAD_PIECE = "<|pad|>"
UNK_PIECE = "<unk>"
EOD_PIECE = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Pieces encoded from literal text (sentencepiece user_defined_symbols), in id order.
CHAT_PIECES: tuple[str, ...] = (IM_START, IM_END)
# pad, unk, eod, then the chat pieces: ids 0..4 in a tokenizer trained by tokenizer_training.py.
NUM_SPECIAL: int = 3 + len(CHAT_PIECES)
# A tokenizer trained by tokenizer_training.py has byte fallback: every byte is a piece.
NUM_BYTE_PIECES = 256
# Specials + byte pieces + at least one learned piece. Sentencepiece also needs one piece
# per distinct character of the training text (at character_coverage=1): see min_vocab_for.
MIN_VOCAB_SIZE = NUM_SPECIAL + NUM_BYTE_PIECES + 1


def min_vocab_for(texts: Sequence[str]) -> tuple[int, int]:
    """(distinct characters, the smallest vocab_size sentencepiece accepts) for training on
    `texts` at character_coverage=1 (one piece per character, newlines aside)."""
    chars = set().union(*map(set, texts)) - {"\n"}
    return len(chars), max(MIN_VOCAB_SIZE, NUM_SPECIAL + NUM_BYTE_PIECES + len(chars))

# The file names a run directory, a checkpoint or an imported model keeps its tokenizer
# under, by backend; the first one present wins.
SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
TOKENIZER_FILES: tuple[str, ...] = (SPM_FILE, HF_FILE)
# tokenizer.json names no end-of-document token: the first of these it holds is EOD
# (GPT-2, Llama 2 / Mistral, Llama 3, Gemma), and of PAD_NAMES the padding.
EOD_NAMES: tuple[str, ...] = (EOD_PIECE, "</s>", "<|end_of_text|>", "<eos>")
PAD_NAMES: tuple[str, ...] = (PAD_PIECE, "<pad>", "[PAD]", "<|finetune_right_pad_id|>")


def is_hf_file(path: str | Path) -> bool:
    return Path(path).suffix == ".json"


def canonical_name(path: str | Path) -> str:
    """The name a copy of the tokenizer at `path` gets in a run or checkpoint directory."""
    return HF_FILE if is_hf_file(path) else SPM_FILE


def find_tokenizer(directory: Path) -> Optional[Path]:
    """The tokenizer file kept in `directory` (see TOKENIZER_FILES), or None."""
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


class Tokenizer:
    """Encode/decode text; no BOS/EOS are added implicitly. `Tokenizer(path)` returns the
    backend that reads `path` (SentencePieceTokenizer or HFTokenizer)."""

    path: Path
    eod_id: int
    pad_id: int
    _chat_ids: dict[str, Optional[int]]

    def __new__(cls, model_path: str | Path = "") -> "Tokenizer":
        if cls is Tokenizer:
            cls = HFTokenizer if is_hf_file(model_path) else SentencePieceTokenizer
        return super().__new__(cls)

    def _open(self, model_path: str | Path) -> Path:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        return path

    def chat_id(self, piece: str) -> Optional[int]:
        """The id of chat piece `piece` (one of CHAT_PIECES), or None if the tokenizer lacks it."""
        return self._chat_ids[piece]

    def _chat_id(self, piece: str) -> int:
        idx = self._chat_ids[piece]
        if idx is None:
            raise ValueError(
                f"tokenizer {self.path} has no {piece} piece; train one with tools/tokenizer.py "
                "(or leave tokenizer.path empty), or import the model with tools/hf_import.py, "
                "to use the chat format"
            )
        return idx

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def im_start_id(self) -> int:
        return self._chat_id(IM_START)

    @property
    def im_end_id(self) -> int:
        return self._chat_id(IM_END)

    @property
    def chat_template(self) -> Any:
        """The model's own chat template (trainer/data/chat_template.ChatTemplate) when a
        tokenizer_config.json with a `chat_template` sits beside the tokenizer file (an
        imported Hugging Face model); None: chatforge's ChatML (trainer/data/chat.py)."""
        if not hasattr(self, "_template"):
            from trainer.data.chat_template import ChatTemplate, read_template_config

            config = read_template_config(self.path)
            self._template = ChatTemplate(config, self) if config is not None else None
        return self._template

    @property
    def end_of_turn_id(self) -> int:
        """The id that ends an assistant turn (generation stops there): `<|im_end|>` in
        ChatML, the chat template's end-of-turn token otherwise."""
        template = self.chat_template
        return template.end_of_turn_id if template is not None else self.im_end_id

    def piece_id(self, piece: str) -> Optional[int]:
        """The id of the single token `piece`, or None if the vocabulary lacks it."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; `<|im_start|>`/`<|im_end|>` inside it become their single ids."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control ids (pad, EOD) decode to nothing."""
        raise NotImplementedError

    def response_text(self, ids: Sequence[int]) -> str:
        """Text of a generated response: its end-of-turn and EOD ids dropped."""
        return self.decode([t for t in ids if t not in (self.end_of_turn_id, self.eod_id)])

    def id_to_piece(self, idx: int) -> str:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model: ours (tokenizer_training.py) or a Llama-style tokenizer.model."""

    def __init__(self, model_path: str | Path) -> None:
        self.path = self._open(model_path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{self.path} is not a valid sentencepiece model: {err}") from err
        self.eod_id = self._sp.eos_id()
        if self.eod_id < 0:
            raise ValueError(
                f"tokenizer {self.path} has no eos piece; it is needed as the end-of-document token"
            )
        pad = self._sp.pad_id()
        # Padding is always masked out of losses, so any id works; eod keeps the vocab unchanged.
        self.pad_id = pad if pad >= 0 else self.eod_id
        self._chat_ids = {piece: self._optional_id(piece) for piece in CHAT_PIECES}

    def _optional_id(self, piece: str) -> Optional[int]:
        idx = self._sp.piece_to_id(piece)
        # piece_to_id answers unk for unknown pieces rather than failing.
        return None if idx == self._sp.unk_id() else int(idx)

    def piece_id(self, piece: str) -> Optional[int]:
        return self._optional_id(piece)

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Like encode for many texts; sentencepiece spreads the batch over threads."""
        return [list(ids) for ids in self._sp.encode(list(texts), out_type=int)]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._sp.decode([int(i) for i in ids]))

    def id_to_piece(self, idx: int) -> str:
        return str(self._sp.id_to_piece(int(idx)))


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` through the `tokenizers` library. Added tokens (the
    chat pieces among them) are matched in text, as transformers does; EOD and pad are the
    first of EOD_NAMES / PAD_NAMES in the vocabulary. Unlike our sentencepiece EOD, a
    literal EOD string in user text does become EOD here (the library's rule)."""

    def __init__(self, model_path: str | Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.path = self._open(model_path)
        try:
            self._tok = RustTokenizer.from_file(str(self.path))
        except Exception as err:  # the library raises a bare Exception on bad JSON
            raise ValueError(f"{self.path} is not a valid tokenizer.json: {err}") from err
        vocab = self._tok.get_vocab(with_added_tokens=True)
        eod = next((vocab[name] for name in EOD_NAMES if name in vocab), None)
        if eod is None:
            raise ValueError(f"tokenizer {self.path} has none of {EOD_NAMES}; one is needed as "
                             "the end-of-document token")
        self.eod_id = int(eod)
        self.pad_id = int(next((vocab[name] for name in PAD_NAMES if name in vocab), eod))
        self._chat_ids = {piece: vocab.get(piece) for piece in CHAT_PIECES}
        self._size = max(vocab.values()) + 1

    @property
    def vocab_size(self) -> int:
        return self._size

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no post-processor BOS/EOS (Llama 3 style files add one).
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        control = (self.pad_id, self.eod_id)
        return str(self._tok.decode([int(i) for i in ids if int(i) not in control],
                                    skip_special_tokens=False))

    def id_to_piece(self, idx: int) -> str:
        return str(self._tok.id_to_token(int(idx)))

    def piece_id(self, piece: str) -> Optional[int]:
        idx = self._tok.token_to_id(piece)
        return None if idx is None else int(idx)


def copy_tokenizer(source: Path, dest_dir: Path) -> Path:
    """Copy the tokenizer file `source` into `dest_dir` under its canonical name, with the
    files beside it that hold the model's chat template (chat_template.TEMPLATE_FILES)."""
    import shutil

    from trainer.data.chat_template import TEMPLATE_FILES

    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = Path(shutil.copyfile(source, dest_dir / canonical_name(source)))
    for name in TEMPLATE_FILES:
        if (Path(source).parent / name).is_file():
            shutil.copyfile(Path(source).parent / name, dest_dir / name)
    return dest


def add_chat_pieces(source: Path, dest: Path) -> list[str]:
    """Copy the tokenizer at `source` to `dest` with the chat pieces it lacks appended at the
    end of its vocabulary (new ids vocab_size, vocab_size + 1, ...), so every existing id
    keeps its meaning. Returns the pieces added. sentencepiece: user-defined pieces (matched
    in text, decoded literally), and the dummy prefix (Llama's "▁" before the first word)
    is switched off: the chat format encodes each segment on its own (trainer/data/chat.py),
    and a prefix per segment would put a "▁" token after every <|im_start|>.
    tokenizer.json: special added tokens (matched in text)."""
    have = Tokenizer(source)
    missing = [piece for piece in CHAT_PIECES if have.chat_id(piece) is None]
    dest.parent.mkdir(parents=True, exist_ok=True)
    if is_hf_file(source):
        _add_hf_tokens(source, dest, missing)
    else:
        dest.write_bytes(_with_spm_pieces(source.read_bytes(), missing))
    grown = Tokenizer(dest)
    if grown.vocab_size != have.vocab_size + len(missing):
        raise ValueError(f"{source}: adding {missing} gave {grown.vocab_size} ids, expected "
                         f"{have.vocab_size + len(missing)} (holes in the vocabulary?)")
    return missing


def _add_hf_tokens(source: Path, dest: Path, missing: list[str]) -> None:
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RustTokenizer

    tok: Any = RustTokenizer.from_file(str(source))
    if missing:
        tok.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in missing])
    tok.save(str(dest))


def _with_spm_pieces(proto_bytes: bytes, missing: list[str]) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(proto_bytes)
    proto.normalizer_spec.add_dummy_prefix = False
    for name in missing:
        piece = proto.pieces.add()
        piece.piece, piece.score = name, 0.0
        piece.type = model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return bytes(proto.SerializeToString())

def tokenizer_of(step_dir: Path) -> Path:
    """The tokenizer a checkpoint was trained with: its own copy, else its run's
    (tokenizer.model or, for a Hugging Face tokenizer, tokenizer.json)."""
    for directory in (step_dir, step_dir.parents[1] / "tokenizer"):
        found = find_tokenizer(directory)
        if found is not None:
            return found
    raise CheckpointError(f"{step_dir}: no {' or '.join(TOKENIZER_FILES)} in it or in its run's "
                          "tokenizer/ directory")
