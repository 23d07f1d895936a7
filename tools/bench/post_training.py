"""Step cost of the post-training stages against pretraining, in one process (not a test).

    python -m tools.bench.post_training [--layers 4 --hidden 256 --heads 8 --seq 256
        --micro-batch 4 --global-batch 16 --segments 3 --vocab 1024 --rounds 5
        --steps-per-block 3 --threads 1 --out FILE.json]

One LM engine and one scalar-head engine of the same shape train on random tokens; every
round runs a block of steps of each kind, in turn, and each ratio is taken within a round
(slow drifts of the machine cancel), then the median over rounds is reported:
  sft_vs_pretrain   SFT tokens/s (packed rows of `segments` conversations: block-diagonal
                    mask, restarted positions, loss mask) / pretraining tokens/s   (goal >= 0.95)
  rm_vs_pretrain    reward-model tokens/s (pairs: 2 rows each, scalar head) / pretraining
                    tokens/s                                                       (goal >= 0.95)
  dpo_vs_2sft       one DPO step on G pairs (2G rows, reference log-probs cached) / two SFT
                    steps on the same G rows (the "2 x SFT forward+backward")        (goal <= 1.05)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch


def _engines(args: argparse.Namespace) -> tuple[Any, Any]:
    torch.set_num_threads(args.threads)
    from chatforge_config.parallel import ModelConfig, OptimConfig, ParallelConfig
    from parallel import cpu_compat
    from parallel.dist import init_distributed, local_env
    from parallel.engine import Engine
    from parallel.groups import init_groups

    init_distributed(local_env())
    cpu_compat.apply()
    shape = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                 seq_length=args.seq)
    lm, scalar = ModelConfig(**shape), ModelConfig(**shape, head="scalar")
    parallel = ParallelConfig()
    topo = init_groups(lm, parallel, 1)
    optim = OptimConfig(lr=1e-4, warmup_steps=0, decay="constant")
    return (Engine(lm, parallel, topo, args.vocab, seed=1, optim=optim, total_steps=10**6),
            Engine(scalar, parallel, topo, args.vocab, seed=1, optim=optim, total_steps=10**6))


def _pack_batch(args: argparse.Namespace, rows: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Rows of `segments` conversations each: positions restart, the loss mask keeps the
    second half of each segment (its "assistant" part)."""
    s = args.seq
    tokens = torch.randint(0, args.vocab, (rows, s + 1), generator=gen)
    bounds = torch.linspace(0, s, args.segments + 1).long()
    segment = torch.zeros(s, dtype=torch.int32)
    positions = torch.zeros(s, dtype=torch.long)
    mask = torch.zeros(s)
    for k in range(args.segments):
        a, b = int(bounds[k]), int(bounds[k + 1])
        segment[a:b] = k + 1
        positions[a:b] = torch.arange(b - a)
        mask[(a + b) // 2:b - 1] = 1.0  # never the label across the boundary
    return {"tokens": tokens, "loss_mask": mask.expand(rows, s).clone(),
            "position_ids": positions.expand(rows, s).clone(),
            "segment_ids": segment.expand(rows, s).clone()}


def _pair_batch(args: argparse.Namespace, pairs: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    s = args.seq
    tokens = torch.randint(0, args.vocab, (2 * pairs, s + 1), generator=gen)
    mask = torch.zeros(2 * pairs, s + 1)
    mask[:, s // 2:s] = 1.0
    return {"tokens": tokens, "response_mask": mask, "ref_logps": -torch.rand(2 * pairs) * 100}


def _split(batch: dict[str, torch.Tensor], micro: int) -> list[dict[str, torch.Tensor]]:
    rows = next(iter(batch.values())).shape[0]
    return [{k: v[i:i + micro] for k, v in batch.items()} for i in range(0, rows, micro)]


def _timed(step: Callable[[], Any], count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        step()
    return (time.perf_counter() - started) / count


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from trainer.stages.dpo import dpo_forward
    from trainer.stages.pretrain import lm_forward
    from trainer.stages.reward import rm_forward
    from trainer.stages.sft import sft_forward

    lm, rm = _engines(args)
    dev = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    g, mb = args.global_batch, args.micro_batch
    pre = _split({"tokens": torch.randint(0, args.vocab, (g, args.seq + 1), generator=gen)}, mb)
    sft = _split(_pack_batch(args, g, gen), mb)
    # G/2 pairs = G rows: the same tokens per step as pretraining.
    pairs = _split(_pair_batch(args, g // 2, gen), mb)
    dpo_pairs = _split(_pair_batch(args, g, gen), 2 * mb)  # G pairs: twice the rows of `sft`
    steps: dict[str, Callable[[], Any]] = {
        "pretrain": lambda: lm.train_step(pre, lambda b, m: lm_forward(b, m, dev)),
        "sft": lambda: lm.train_step(sft, lambda b, m: sft_forward(b, m, dev)),
        "rm": lambda: rm.train_step(pairs, lambda b, m: rm_forward(b, m, dev)),
        "dpo": lambda: lm.train_step(dpo_pairs, lambda b, m: dpo_forward(b, m, dev, beta=0.1)),
    }
    for step in steps.values():
        step()  # warm-up: allocations, first-call paths
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        times = {name: _timed(steps[name], args.steps_per_block) for name in order}
        rounds.append(times)
        print(f"round {r}: " + ", ".join(f"{k} {v:.3f}s" for k, v in times.items()), flush=True)
    tokens = g * args.seq
    ratios = {
        "sft_vs_pretrain": [t["pretrain"] / t["sft"] for t in rounds],
        "rm_vs_pretrain": [t["pretrain"] / t["rm"] for t in rounds],
        "dpo_vs_2sft": [t["dpo"] / (2 * t["sft"]) for t in rounds],
    }
    return {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "tokens_per_s": {k: tokens / statistics.median(t[k] for t in rounds) for k in ("pretrain", "sft", "rm")},
        "median": {k: statistics.median(v) for k, v in ratios.items()},
        "ratios": ratios,
    }


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("layers", 4), ("hidden", 256), ("heads", 8), ("seq", 256), ("micro-batch", 4),
                          ("global-batch", 16), ("segments", 3), ("vocab", 1024), ("rounds", 5),
                          ("steps-per-block", 3), ("threads", 1)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = measure(args)
    print(json.dumps(result["median"], indent=1))
    print("tokens/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in result["tokens_per_s"].items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
