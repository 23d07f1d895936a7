"""Data of the chat stages (SFT, reward model, DPO, best-of-N), prepared once per run.

Where the tokenizer comes from, in order: the run's own `tokenizer/tokenizer.model` (a
resume); `tokenizer.path`; the checkpoint named by `ckpt.load` (the model was trained with
it, so it must be the same); otherwise one is trained on the stage's text. It is always
copied to `<run.dir>/tokenizer/tokenizer.model`, so the next stage and every checkpoint find it
(`tokenizer.json` instead for a Hugging Face tokenizer: trainer/data/tokenizer.py).

What each stage reads from `data.format`:
    conversations (SFT)   embedded | chatml | alpaca | hh_rlhf / preference (prompt + chosen)
    pairs (RM, DPO)       embedded | hh_rlhf | preference
    prompts (best-of-N)   embedded | chatml | alpaca (all turns before the last assistant
                          turn) | hh_rlhf / preference (the pair's prompt)

Rank 0 builds the arrays and writes `<run.dir>/data/<kind>.npz` with a JSON marker (counts
of kept, truncated and dropped samples); the other ranks load them after a barrier.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from trainer.data import chat_embedded
from trainer.data.corpus import TASKS, gold_answer, parse_prompt
from trainer.data.chat import Message, prompt_ids, response_ids, tokenize_conversation, truncate
from trainer.data.gpt_dataset import split_documents
from trainer.data.indexed import atomic_write
from trainer.data.packing import ChatSample, build_packed, build_padded, fit_samples, pack
from trainer.data.readers import (PreferencePair, PromptItem, detect_format, read_conversations, read_pairs,
                                  read_prompts)
from trainer.data.sources import columns_of as columns
from trainer.data.formats import CONVERSATION_FORMATS, PAIR_FORMATS
from trainer.data.tokenizer import Tokenizer, copy_tokenizer, find_tokenizer

Arrays = dict[str, np.ndarray]


# ---- sources -------------------------------------------------------------------------------

def _families(emb: Any) -> list[str]:
    names = [f.strip() for f in str(emb.families).split(",") if f.strip()]
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        raise ValueError(f"data.embedded.families={emb.families}: unknown {unknown}; known: {sorted(TASKS)}")
    return names


def data_format(cfg: Any) -> str:
    """data.format, with `auto` resolved to the shape of data.path's first record."""
    fmt = str(cfg.data.format)
    return detect_format(str(cfg.data.path), columns(cfg)) if fmt == "auto" else fmt


def conversations(cfg: Any) -> list[list[Message]]:
    fmt, emb = data_format(cfg), cfg.data.embedded
    if fmt == "embedded":
        return chat_embedded.sft_conversations(int(emb.num_chats), int(emb.seed), _families(emb))
    if fmt in ("hh_rlhf", "preference"):
        return [[*p.prompt, Message("assistant", p.chosen)] for p in read_pairs(fmt, str(cfg.data.path), columns(cfg))]
    if fmt in CONVERSATION_FORMATS:
        return read_conversations(fmt, str(cfg.data.path), columns(cfg))
    raise ValueError(f"data.format={fmt!r}: the SFT stage reads one of {CONVERSATION_FORMATS}")


def pairs(cfg: Any) -> list[PreferencePair]:
    fmt, emb = data_format(cfg), cfg.data.embedded
    if fmt == "embedded":
        return chat_embedded.preference_pairs(int(emb.num_pairs), int(emb.seed), float(emb.flip),
                                              _families(emb), str(emb.prefer), same_style=float(emb.same_style))
    if fmt in PAIR_FORMATS:
        return read_pairs(fmt, str(cfg.data.path), columns(cfg))
    raise ValueError(f"data.format={fmt!r}: preference stages read one of {PAIR_FORMATS}")


def heldout_pairs(cfg: Any, n: int) -> list[PreferencePair]:
    """`n` embedded pairs for testing a reward model: drawn apart from the training pairs, on
    the tasks data.embedded.eval_tasks names, with clean labels (no data.embedded.flip)."""
    emb = cfg.data.embedded
    return chat_embedded.preference_pairs(n, int(emb.seed), 0.0, _families(emb), str(emb.prefer),
                                          test=str(emb.eval_tasks))


def prompts(cfg: Any, split: str = "eval") -> list[list[Message]]:
    """Prompts ending with a user turn (generation continues as the assistant). The
    embedded world gives held-out tasks for split="eval" and training tasks (data.embedded
    .num_chats of them) for split="train"; a file gives all of its prompts."""
    fmt, emb = data_format(cfg), cfg.data.embedded
    if fmt == "embedded":
        if split == "train":
            return chat_embedded.train_prompts(int(emb.num_chats), int(emb.seed), _families(emb))
        return chat_embedded.eval_prompts(int(emb.num_prompts), int(emb.seed), _families(emb), str(emb.eval_tasks))
    if fmt in PAIR_FORMATS:
        return [p.prompt for p in read_pairs(fmt, str(cfg.data.path), columns(cfg))]
    if fmt == "prompts":
        return [p for p, _ in read_prompts(str(cfg.data.path), columns(cfg))]
    found = []
    for conv in conversations(cfg):
        last = max(i for i, m in enumerate(conv) if m.role == "assistant")
        found.append(conv[:last])
    return found


PromptKey = tuple[tuple[str, str], ...]


def prompt_key(messages: list[Message]) -> PromptKey:
    """A prompt's messages as a hashable key: two prompts are word for word the same iff equal."""
    return tuple((m.role, m.content) for m in messages)


def embedded_training_prompts(emb: Any) -> set[PromptKey]:
    """Every prompt a post-training stage can train on in the embedded world of `emb`
    (a data.embedded config): each SFT conversation's prompt before every assistant turn,
    every preference pair's prompt (RM, DPO; both splits) and the RL / rejection-sampling
    training prompts (data.embedded.num_chats of them; rejection sampling takes a prefix)."""
    families = _families(emb)
    seed = int(emb.seed)
    keys: set[PromptKey] = set()
    for conv in chat_embedded.sft_conversations(int(emb.num_chats), seed, families):
        keys.update(prompt_key(conv[:i]) for i, m in enumerate(conv) if m.role == "assistant")
    keys.update(prompt_key(p.prompt) for p in chat_embedded.preference_pairs(
        int(emb.num_pairs), seed, float(emb.flip), families, str(emb.prefer)))
    keys.update(prompt_key(p) for p in chat_embedded.train_prompts(int(emb.num_chats), seed, families))
    return keys


def gold_of(cfg: Any) -> Optional[Callable[[list[Message], str], float]]:
    """The embedded world's gold reward for this run's data (data.embedded.prefer), as a
    function of (prompt, response text); None for a user's file (no gold answers)."""
    if str(cfg.data.format) != "embedded":
        return None
    prefer = str(cfg.data.embedded.prefer)
    return lambda messages, text: chat_embedded.gold_reward(messages, text, prefer)


# ---- tokenizer ------------------------------------------------------------------------------

def resolve_tokenizer(cfg: Any, run_dir: Path, texts: Callable[[], list[str]]) -> Path:
    """Rank 0 only: the run's tokenizer (see the module docstring), copied into the run."""
    found = find_tokenizer(run_dir / "tokenizer")
    if found is not None:
        return found
    own = run_dir / "tokenizer" / "tokenizer.model"
    own.parent.mkdir(parents=True, exist_ok=True)
    if cfg.tokenizer.path:
        source = Path(str(cfg.tokenizer.path))
        if not source.is_file():
            raise FileNotFoundError(f"tokenizer.path: file not found: {source}")
        return copy_tokenizer(source, own.parent)
    if cfg.ckpt.load:
        from trainer.checkpoint_files import resolve_load_path
        from trainer.data.tokenizer import tokenizer_of

        source = tokenizer_of(resolve_load_path(Path(str(cfg.ckpt.load))))
        return copy_tokenizer(source, own.parent)  # with its chat template, if it has one
    from trainer.data.tokenizer_training import train_tokenizer

    corpus = run_dir / "data" / "tokenizer_corpus.txt"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(corpus, ("\n".join(t.replace("\n", " ") for t in texts()) + "\n").encode("utf-8"))
    train_tokenizer(own.with_suffix(""), int(cfg.tokenizer.vocab_size), files=[corpus],
                    model_type=str(cfg.tokenizer.model_type),
                    character_coverage=float(cfg.tokenizer.character_coverage),
                    max_sentences=int(cfg.tokenizer.max_sentences), seed=0)
    return own


def _conversation_texts(convs: list[list[Message]]) -> list[str]:
    return [m.content for conv in convs for m in conv]


# ---- arrays ---------------------------------------------------------------------------------

def sft_arrays(cfg: Any, tok: Tokenizer, convs: list[list[Message]], seed: int) -> tuple[Arrays, dict[str, int]]:
    """Tokenize, fit to model.seq_length (truncate or drop), then pack or pad."""
    seq = int(cfg.model.seq_length)
    samples = [ChatSample(*tokenize_conversation(tok, conv)) for conv in convs]
    fitted, counts = fit_samples(samples, seq, str(cfg.data.overlong))
    if not fitted:
        return {}, counts
    if bool(cfg.data.packing):
        arrays = build_packed(fitted, pack(fitted, seq, seed), seq, tok.pad_id)
    else:
        arrays = build_padded(fitted, seq, tok.pad_id)
    return arrays, counts


def response_row(prompt: list[int], response: list[int], seq: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """prompt + response, truncated to `seq` tokens (chat.truncate) and right-padded to
    seq + 1 -> (tokens [S+1], token-aligned response mask [S+1]). The sequence fits in the
    model's S inputs, so a reward can be read at the response's last token."""
    prompt, response = truncate(prompt, response, seq)
    tokens = np.full(seq + 1, pad_id, dtype=np.int64)
    mask = np.zeros(seq + 1, dtype=np.float32)
    tokens[:len(prompt) + len(response)] = prompt + response
    mask[len(prompt):len(prompt) + len(response)] = 1.0
    return tokens, mask


def longest_row(prompts: list[list[int]], responses: list[list[int]], cap: int) -> int:
    """The longest prompt + response, at most `cap`: rows need no more (no compute on padding)."""
    return min(max(len(p) + len(r) for p, r in zip(prompts, responses)), cap)


def response_rows(prompts: list[list[int]], responses: list[list[int]], seq: int, pad_id: int) -> dict[str, Any]:
    """prompt + response rows of `seq` tokens (+1) as torch tensors (see response_row)."""
    import torch  # the rows feed model forwards; this module stays usable without torch

    built = [response_row(p, r, seq, pad_id) for p, r in zip(prompts, responses)]
    return {"tokens": torch.from_numpy(np.stack([t for t, _ in built])),
            "response_mask": torch.from_numpy(np.stack([m for _, m in built]))}


def pair_arrays(cfg: Any, tok: Tokenizer, items: list[PreferencePair]) -> tuple[Arrays, dict[str, int]]:
    """Each pair -> tokens [2, S+1] (chosen, rejected; right-padded) and a token-aligned
    response mask [2, S+1]. Both sequences fit in the model's S inputs, so the reward can
    be read at the response's last token."""
    seq = int(cfg.model.seq_length)
    drop = str(cfg.data.overlong) == "drop"
    tokens, masks = [], []
    counts = {"kept": 0, "truncated": 0, "dropped": 0}
    for pair in items:
        prompt = prompt_ids(tok, pair.prompt)
        rows = [(prompt, response_ids(tok, text)) for text in (pair.chosen, pair.rejected)]
        too_long = any(len(p) + len(r) > seq for p, r in rows)
        if too_long and drop:
            counts["dropped"] += 1
            continue
        counts["truncated" if too_long else "kept"] += 1
        fitted = [response_row(p, r, seq, tok.pad_id) for p, r in rows]
        tokens.append(np.stack([t for t, _ in fitted]))
        masks.append(np.stack([m for _, m in fitted]))
    if not tokens:
        return {}, counts
    return {"tokens": np.stack(tokens), "response_mask": np.stack(masks)}, counts


# ---- once per run ---------------------------------------------------------------------------

def _save(path: Path, arrays: Arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


def _load(path: Path) -> Arrays:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _split(n: int, cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    if n < 2:
        raise ValueError(f"data: {n} usable samples; a chat stage needs at least 2 (train and eval)")
    return split_documents(n, float(cfg.data.eval_fraction), int(cfg.data.split_seed))


def prepare_chat_data(ctx: Any, kind: str, items: Optional[list[Any]] = None) -> tuple[Path, Arrays, Arrays]:
    """(tokenizer path, train arrays, eval arrays) for kind "sft" or "pairs"; collective.
    `items` replaces the configured data (rejection sampling trains on its winners)."""
    cfg, run_dir = ctx.cfg, ctx.run_dir
    data_dir = run_dir / "data"
    marker = data_dir / f"{kind}.json"
    if ctx.is_main and not marker.is_file():
        data_dir.mkdir(parents=True, exist_ok=True)
        if items is None:
            items = conversations(cfg) if kind == "sft" else pairs(cfg)
        texts = (lambda: _conversation_texts(items)) if kind == "sft" else (
            lambda: _conversation_texts([[*p.prompt, Message("assistant", p.chosen),
                                          Message("assistant", p.rejected)] for p in items]))
        tok = Tokenizer(resolve_tokenizer(cfg, run_dir, texts))
        train_idx, eval_idx = _split(len(items), cfg)
        record: dict[str, Any] = {"format": str(cfg.data.format), "items": len(items)}
        for part, idx in (("train", train_idx), ("eval", eval_idx)):
            chosen = [items[int(i)] for i in idx]
            if kind == "sft":
                arrays, counts = sft_arrays(cfg, tok, chosen, int(cfg.seed))
            else:
                arrays, counts = pair_arrays(cfg, tok, chosen)
            if not arrays:
                raise ValueError(f"data: no {part} sample fits model.seq_length={cfg.model.seq_length} "
                                 f"({counts}); use data.overlong=truncate or a longer model.seq_length")
            _save(data_dir / f"{kind}_{part}.npz", arrays)
            record[part] = {**counts, "rows": int(len(next(iter(arrays.values()))))}
        atomic_write(marker, (json.dumps(record, indent=1) + "\n").encode("utf-8"))
        print(f"[chatforge] {kind} data ({cfg.data.format}): {json.dumps(record)}", flush=True)
    ctx.barrier()
    tok_path = _run_tokenizer(run_dir)
    ctx.tokenizer_path = tok_path
    return tok_path, _load(data_dir / f"{kind}_train.npz"), _load(data_dir / f"{kind}_eval.npz")


def _fix_tokenizer(ctx: Any, found: list[list[Message]]) -> Path:
    if ctx.is_main:
        resolve_tokenizer(ctx.cfg, ctx.run_dir, lambda: _conversation_texts(found))
    ctx.barrier()
    tok_path = _run_tokenizer(ctx.run_dir)
    ctx.tokenizer_path = tok_path
    return tok_path


def _run_tokenizer(run_dir: Path) -> Path:
    """The tokenizer file rank 0 put into <run_dir>/tokenizer/ (resolve_tokenizer)."""
    found = find_tokenizer(run_dir / "tokenizer")
    if found is None:
        raise FileNotFoundError(f"{run_dir / 'tokenizer'}: no tokenizer file (rank 0 writes it first)")
    return found


def prepare_prompts(ctx: Any, limit: int = 0, split: str = "eval") -> tuple[Path, list[list[Message]]]:
    """(tokenizer path, prompts of `split`): cheap, so every rank reads them; rank 0 fixes
    the tokenizer first."""
    found = prompts(ctx.cfg, split)
    if limit > 0:
        found = found[:limit]
    return _fix_tokenizer(ctx, found), found


def embedded_metadata(prompt: list[Message]) -> dict[str, Any]:
    """The fields an embedded prompt carries for reward functions: its task family and the
    reference answer (what the gold verifier checks; "answer" is what `math` reads)."""
    user = [m.content for m in prompt if m.role == "user"][-1]
    family, _ = parse_prompt(user)
    return {"family": family.name, "answer": gold_answer(user)}


def rl_prompt_items(cfg: Any, split: str = "train") -> list[PromptItem]:
    """Prompts with their per-prompt fields: the embedded world's (family, answer), a
    "prompts" file's extra columns, none for the other formats."""
    fmt = data_format(cfg)
    # data.format=auto on conversations: read them as prompts, so that their other columns
    # (a reference answer ...) reach the rewards as with format=prompts.
    if fmt == "prompts" or (fmt == "chatml" and str(cfg.data.format) == "auto"):
        return read_prompts(str(cfg.data.path), columns(cfg))
    found = prompts(cfg, split)
    if str(cfg.data.format) == "embedded":
        return [(p, embedded_metadata(p)) for p in found]
    return [(p, {}) for p in found]


def prepare_rl_prompts(ctx: Any) -> tuple[Path, list[PromptItem], list[PromptItem]]:
    """(tokenizer path, training prompts, evaluation prompts), each with its fields, for the
    RL stages. Embedded: training tasks and held-out ones (data.embedded.num_prompts); a file:
    its prompts split by data.eval_fraction (evaluation capped at data.embedded.num_prompts)."""
    cfg = ctx.cfg
    if str(cfg.data.format) == "embedded":
        train, evals = rl_prompt_items(cfg, "train"), rl_prompt_items(cfg, "eval")
    else:
        found = rl_prompt_items(cfg, "train")
        train_idx, eval_idx = _split(len(found), cfg)
        train = [found[int(i)] for i in train_idx]
        evals = [found[int(i)] for i in eval_idx][:int(cfg.data.embedded.num_prompts)]
    return _fix_tokenizer(ctx, [p for p, _ in train + evals]), train, evals
