"""torch.profiler op tables of the two trainers of tools/bench/pretrain_throughput.py (not a test).

    python -m tools.bench.pretrain_profile [--steps 3 --top 15 --threads 1] [pretrain_throughput flags]

Builds both trainers exactly as the throughput benchmark does (same shape, weights, data),
runs `--warmup` steps of each, then profiles `--steps` steps of each on the same batches
(alternating ours, plain, one step at a time) and prints a side-by-side table of the ops
either one spends most self CPU time on. Where the throughput ratio says how far apart the
two are, this says where.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from tools.bench.pretrain_throughput import build, parse_args


def profile_steps(step, batches: Sequence[torch.Tensor]) -> dict[str, tuple[int, float]]:
    """-> {op name: (calls, self CPU ms)} over `batches` (one step each)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            step(batch)
    return {e.key: (e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()}


def side_by_side(tables: dict[str, dict[str, tuple[int, float]]], top: int) -> str:
    """A markdown table of the `top` ops by the larger self CPU time of the two."""
    ours, plain = tables["ours"], tables["plain"]
    names = sorted(set(ours) | set(plain), key=lambda n: -max(ours.get(n, (0, 0.0))[1], plain.get(n, (0, 0.0))[1]))
    rows = ["| op | ours calls | ours self ms | plain calls | plain self ms |", "|---|---|---|---|---|"]
    for name in names[:top]:
        (oc, om), (pc, pm) = ours.get(name, (0, 0.0)), plain.get(name, (0, 0.0))
        rows.append(f"| {name} | {oc} | {om:.1f} | {pc} | {pm:.1f} |")
    totals = {who: sum(ms for _, ms in t.values()) for who, t in tables.items()}
    rows.append(f"| total self CPU | | {totals['ours']:.1f} | | {totals['plain']:.1f} |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--steps", type=int, default=3, help="profiled steps per trainer")
    p.add_argument("--top", type=int, default=15, help="rows in the side-by-side table")
    own, rest = p.parse_known_args(argv)
    # The throughput benchmark's flags; its batches: warm-up, then `steps` profiled ones.
    args = parse_args([*rest, "--pairs", "1", "--steps-per-block", str(own.steps)])
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    _, ours, plain, batches, _ = build(args)
    trainers = {"ours": ours.step, "plain": plain.step}
    for step in trainers.values():
        for batch in batches[:args.warmup]:
            step(batch)
    # One profiled step at a time, alternating (as the throughput benchmark alternates its
    # blocks): a drift of the machine lands on both, not on whichever ran first.
    tables: dict[str, dict[str, tuple[int, float]]] = {who: {} for who in trainers}
    for batch in batches[args.warmup:args.warmup + own.steps]:
        for who, step in trainers.items():
            for name, (calls, ms) in profile_steps(step, [batch]).items():
                before = tables[who].get(name, (0, 0.0))
                tables[who][name] = (before[0] + calls, before[1] + ms)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {own.steps} steps each, "
          f"self CPU time per op (ms)")
    print(side_by_side(tables, own.top))


if __name__ == "__main__":
    main()
