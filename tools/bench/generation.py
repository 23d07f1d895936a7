"""Greedy generation tokens/s with the KV cache versus recomputing the sequence (not a test).

    python -m tools.bench.generation [--batch 8 --prompt 32 --new 64 --layers 4 --hidden 256
        --heads 8 --seq 128 --vocab 1024 --threads 1 --repeats 3 --out FILE.json]

ONE process, one random model (megatron GPTModel through parallel.engine.Engine, TP1 PP1),
one batch of random prompts of `--prompt` tokens each; `trainer.generation.generate`
decodes `--new` tokens greedily, with no stop id so every row runs to the end. The two
paths alternate (cache, no cache, cache, ...) `--repeats` times after one untimed warm-up
each, which cancels slow drifts of the machine; each pair's ratio is cache/no-cache
tokens/s and the median ratio is the headline. The two outputs must be equal token for
token (greedy with and without the cache is the same computation, reordered).

--before also runs both paths with megatron's own linear and TP-region code
(parallel.layers.megatron_paths: what the engine ran before GradFreeLinear and
skip_tp1_regions), alternating with ours in the same loop, and reports its ratio and the
cached decode's CPU-time speed-up; all four outputs must be equal.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench.generation",
                                description="KV-cache versus recompute generation speed")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32, help="tokens per prompt")
    p.add_argument("--new", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=128, help="model.seq_length (>= prompt + new)")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each path")
    p.add_argument("--before", action="store_true",
                   help="also time megatron's own linear and TP-region paths (parallel.layers.megatron_paths), "
                        "alternating with ours in the same run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.prompt + args.new > args.seq:
        p.error(f"--seq {args.seq}: shorter than --prompt {args.prompt} + --new {args.new}")
    return args


def build_engine(args: argparse.Namespace) -> Any:
    from chatforge_config.parallel import ModelConfig, ParallelConfig
    from parallel import cpu_compat
    from parallel.dist import init_distributed, local_env
    from parallel.groups import init_groups

    init_distributed(local_env())
    cpu_compat.apply()
    from parallel.engine import Engine

    model = ModelConfig(name="bench", num_layers=args.layers, hidden_size=args.hidden,
                        num_attention_heads=args.heads, seq_length=args.seq)
    parallel = ParallelConfig()
    topo = init_groups(model, parallel, args.seed)
    return Engine(model, parallel, topo, vocab_size=args.vocab, seed=args.seed)  # frozen


def timed(engine: Any, prompts: list[list[int]], args: argparse.Namespace,
          use_cache: bool) -> tuple[float, float, list[list[int]]]:
    """-> (wall seconds, process CPU seconds, generated tokens) of one greedy generation.
    CPU time is what a loaded machine does not inflate (other processes' time is not ours)."""
    from trainer.generation import SamplingConfig, generate

    sampling = SamplingConfig(max_new_tokens=args.new, temperature=0.0, use_cache=use_cache)
    wall, cpu = time.perf_counter(), time.process_time()
    out = generate(engine, prompts, sampling, stop_ids=set(), pad_id=0, seed=args.seed,
                   vocab_size=args.vocab)
    return time.perf_counter() - wall, time.process_time() - cpu, out.tokens


def measure(engine: Any, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """Cache and no cache alternating; with --before, megatron's own layer paths
    (parallel.layers.megatron_paths) alternate with ours in the same loop."""
    import contextlib

    from parallel.layers import megatron_paths

    variants = ["ours", "megatron"] if args.before else ["ours"]
    scope = {"ours": contextlib.nullcontext, "megatron": lambda: megatron_paths(engine.module)}
    wall = {(v, c): [] for v in variants for c in (True, False)}
    cpu = {(v, c): [] for v in variants for c in (True, False)}
    outputs = {}
    for v in variants:
        with scope[v]():
            for use_cache in (True, False):  # warm-up, untimed
                outputs[(v, use_cache)] = timed(engine, prompts, args, use_cache)[2]
    for r in range(args.repeats):
        for v in variants if r % 2 == 0 else variants[::-1]:
            with scope[v]():
                for use_cache in (True, False):
                    elapsed, used, tokens = timed(engine, prompts, args, use_cache)
                    wall[(v, use_cache)].append(elapsed)
                    cpu[(v, use_cache)].append(used)
                    assert tokens == outputs[(v, use_cache)], "greedy generation is not deterministic"
    found = summarize(wall, cpu, outputs, "ours", args)
    if args.before:
        found["megatron_paths"] = summarize(wall, cpu, outputs, "megatron", args)
        found["cache_speedup_vs_megatron_paths_cpu"] = statistics.median(
            m / o for m, o in zip(cpu[("megatron", True)], cpu[("ours", True)]))
        found["outputs_equal"] = found["outputs_equal"] and outputs[("ours", True)] == outputs[("megatron", True)]
    return found


def summarize(wall_all: dict[tuple[str, bool], list[float]], cpu_all: dict[tuple[str, bool], list[float]],
              outputs_all: dict[tuple[str, bool], list[list[int]]], variant: str,
              args: argparse.Namespace) -> dict[str, Any]:
    wall = {c: wall_all[(variant, c)] for c in (True, False)}
    cpu = {c: cpu_all[(variant, c)] for c in (True, False)}
    outputs = {c: outputs_all[(variant, c)] for c in (True, False)}
    generated = args.batch * args.new
    ratios = [nc / c for c, nc in zip(wall[True], wall[False])]
    cpu_ratios = [nc / c for c, nc in zip(cpu[True], cpu[False])]
    return {
        "cache_seconds": wall[True], "nocache_seconds": wall[False],
        "cache_cpu_seconds": cpu[True], "nocache_cpu_seconds": cpu[False],
        "cache_tokens_per_s_median": generated / statistics.median(wall[True]),
        "nocache_tokens_per_s_median": generated / statistics.median(wall[False]),
        "pair_ratios": ratios, "median_ratio": statistics.median(ratios),
        "median_cpu_time_ratio": statistics.median(cpu_ratios),
        "outputs_equal": outputs[True] == outputs[False],
    }


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = build_engine(args)
    gen = torch.Generator().manual_seed(args.seed)
    # Ids from 5 up: clear of the special tokens (0 pad, 2 <|endoftext|>, 4 <|im_end|>).
    prompts = torch.randint(5, args.vocab, (args.batch, args.prompt), generator=gen).tolist()
    params = engine.parameter_count()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.layers} layers, "
          f"hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}, {params / 1e6:.2f}M "
          f"parameters; batch {args.batch} x prompt {args.prompt} + {args.new} new tokens", flush=True)
    summary = measure(engine, prompts, args)
    print(f"   cache: median {summary['cache_tokens_per_s_median']:8.1f} tokens/s")
    print(f"no cache: median {summary['nocache_tokens_per_s_median']:8.1f} tokens/s")
    print("pair ratios (cache/no cache): " + " ".join(f"{r:.2f}" for r in summary["pair_ratios"]))
    print(f"median ratio cache/no cache: {summary['median_ratio']:.2f} (from CPU time: "
          f"{summary['median_cpu_time_ratio']:.2f}); outputs equal: {summary['outputs_equal']}")
    if args.before:
        before = summary["megatron_paths"]
        print(f"megatron's paths: cache {before['cache_tokens_per_s_median']:.1f}, no cache "
              f"{before['nocache_tokens_per_s_median']:.1f} tokens/s; median ratio {before['median_ratio']:.2f} "
              f"(CPU time {before['median_cpu_time_ratio']:.2f}); pair ratios "
              + " ".join(f"{r:.2f}" for r in before["pair_ratios"]))
        print(f"cached decode, megatron's paths / ours (CPU time): {summary['cache_speedup_vs_megatron_paths_cpu']:.2f}")
    report = {"command": " ".join(["python -m tools.bench.generation", *(argv or sys.argv[1:])]),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "parameters": params, **summary}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not summary["outputs_equal"]:
        raise SystemExit("cache and no-cache outputs differ")
    return report


if __name__ == "__main__":
    main()
