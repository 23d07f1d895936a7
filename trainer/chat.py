"""`chatforge chat ckpt=<run or checkpoint> [system=...] [examples=<chatml.jsonl>] [seed=N]
[sampling.temperature=... sampling.top_k=... sampling.top_p=... sampling.max_new_tokens=...]`:
talk to a checkpoint in the terminal (one process; `python -m trainer.chat key=value ...`).

Lines typed are user turns; `/reset` forgets the conversation (keeping the system prompt and
the few-shot examples), `/exit` (or end of input) quits. The few-shot file holds chatML
conversations (`{"messages": [...]}` per line) that are placed before the conversation.
When the conversation outgrows the model's context, the oldest turns after the system prompt
and the examples are dropped.
"""
from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional, TextIO

from chatforge_config.trainer import SamplingConfig

HELP = __doc__ or ""
KEYS = ("ckpt", "system", "examples", "seed") + tuple(f"sampling.{f.name}" for f in fields(SamplingConfig))


def parse_args(argv: list[str]) -> dict[str, str]:
    """key=value pairs; unknown keys and a missing ckpt are errors naming the key."""
    args: dict[str, str] = {}
    for item in argv:
        key, eq, value = item.partition("=")
        if not eq or key not in KEYS:
            raise ValueError(f"{item!r}: expected key=value with key one of {', '.join(KEYS)}")
        args[key] = value
    if not args.get("ckpt"):
        raise ValueError("ckpt=<run dir, checkpoints dir or step dir> is required")
    return args


def _sampling(args: dict[str, str]) -> SamplingConfig:
    sampling = SamplingConfig(temperature=0.7, top_p=0.9)
    for f in fields(SamplingConfig):
        key = f"sampling.{f.name}"
        if key in args:
            raw = args[key]
            value: Any = raw.lower() in ("1", "true", "yes") if f.type in (bool, "bool") else type(getattr(sampling, f.name))(raw)
            setattr(sampling, f.name, value)
    return sampling


class ChatSession:
    """The conversation and how it becomes a prompt that fits the context."""

    def __init__(self, tok: Any, prefix: list[Any], seq_length: int, max_new: int) -> None:
        self.tok, self.prefix = tok, prefix
        self.budget = seq_length - max_new
        self.turns: list[Any] = []

    def prompt(self) -> list[int]:
        from trainer.data.chat import prompt_ids

        while True:
            ids = prompt_ids(self.tok, self.prefix + self.turns)
            if len(ids) <= self.budget or len(self.turns) <= 1:
                return ids[-self.budget:]
            self.turns = self.turns[2:]  # the oldest exchange goes first


def run(args: dict[str, str], stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    from trainer import runtime
    from trainer.checkpoint_files import resolve_load_path
    from trainer.checkpointing import load_weights
    from trainer.data.tokenizer import tokenizer_of
    from trainer.data.chat import Message
    from trainer.data.readers import read_chatml
    from trainer.data.tokenizer import Tokenizer
    from trainer.generation import generate

    step_dir = resolve_load_path(Path(args["ckpt"]))
    cfg = runtime.load_config(step_dir / "config.yaml")
    cfg.parallel.tp = cfg.parallel.pp = 1
    if cfg.model.head != "lm":
        raise ValueError(f"ckpt={args['ckpt']}: a model.head={cfg.model.head} checkpoint cannot chat")
    sampling = _sampling(args)
    ctx = runtime.start(cfg)
    try:
        from parallel.engine import Engine

        tok = Tokenizer(tokenizer_of(step_dir))
        engine = Engine(cfg.model, cfg.parallel, ctx.topo, vocab_size=tok.vocab_size, seed=int(cfg.seed))
        load_weights(step_dir, {"model": engine}, cfg.model)
        prefix = [Message("system", args["system"])] if args.get("system") else []
        if args.get("examples"):
            prefix += [m for conv in read_chatml(args["examples"]) for m in conv]
        session = ChatSession(tok, prefix, int(cfg.model.seq_length), sampling.max_new_tokens)
        seed = int(args.get("seed", cfg.seed))
        print(f"chatforge chat: {step_dir} (/reset, /exit)", file=stdout, flush=True)
        for turn, line in enumerate(stdin):
            text = line.strip()
            if text == "/exit":
                break
            if text == "/reset":
                session.turns = []
                print("(conversation reset)", file=stdout, flush=True)
                continue
            if not text:
                continue
            session.turns.append(Message("user", text))
            gen = generate(engine, [session.prompt()], sampling, stop_ids={tok.end_of_turn_id, tok.eod_id},
                           pad_id=tok.pad_id, seed=seed + turn, vocab_size=tok.vocab_size)
            reply = tok.response_text(gen.tokens[0])
            session.turns.append(Message("assistant", reply))
            print(f"assistant> {reply}", file=stdout, flush=True)
    finally:
        runtime.close(ctx)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Started by `chatforge chat`, which has checked the arguments and answered --help."""
    return run(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
