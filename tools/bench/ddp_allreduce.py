"""Megatron DDP's gradient all-reduce per step versus a raw all-reduce of the same bytes (not a test).

    python -m tools.bench.ddp_allreduce [--procs 2 --layers 4 --hidden 256 --heads 8 --seq 256
        --micro-batch 4 --rounds 9 --warmup 2 --settings off,on,on:1000000 --out FILE.json]
    (--tiny: a 2-layer, 64-hidden model, seq 64, 3 rounds unless --rounds: a quick check)

`--procs` ranks on this machine (launcher.local.run_local, the launcher's own spawner; gloo on
CPU, NCCL with one GPU per rank), data parallel over all of them (TP1, PP1). For each DDP
setting in --settings ("off": parallel.overlap_grad_reduce=false, megatron's one bucket,
reduced after the backward; "on": overlap on, megatron's default bucket size of
max(40M, 1M x DP) parameters; "on:N": overlap on, parallel.ddp_bucket_size=N parameters) a
parallel.engine.Engine (megatron DDP, fp32 grad buffer, as the trainer builds it) is built, and
each round runs, in alternating order:
  ddp   one forward/backward of a micro batch through the engine's schedule with the
        engine's finalize step taken out, a barrier (on a separate gloo group, so rank skew
        is not counted and launched buckets are not waited for), then the clock around DDP's
        `finish_grad_sync()`: with overlap off that is the whole bucketed all-reduce; with
        overlap on the buckets were launched during the backward and this is the part left
        exposed at its end (what a step waits for);
  raw   the same barrier, then the clock around `torch.distributed.all_reduce` of one flat fp32
        tensor of the grad buffer's size (the same bytes).
With overlap off each round adds --inner - 1 more pairs (DDP's all-reduce of the same buffer
again, a raw all-reduce; order alternating), cheap samples on a noisy machine.
The ratio ddp/raw is taken within each pair; the headline is the median over pairs
(goal <= 1.25). The time of forward + backward + sync per setting is reported too, which is
what overlap is meant to shorten. Every time is the maximum over ranks. Rank 0 prints and
writes the JSON; with a GPU, clocks are read after torch.cuda.synchronize().
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench.ddp_allreduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, default=2, help="ranks (data parallel size)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per setting (9; --tiny: 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per setting")
    p.add_argument("--inner", type=int, default=5,
                   help="overlap off: DDP/raw pairs per backward (the all-reduce needs no new backward)")
    p.add_argument("--settings", default="off,on", help="comma-separated: off | on | on:<bucket parameters>")
    p.add_argument("--tiny", action="store_true", help="2 layers, hidden 64, seq 64, 3 rounds")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a rank (set by the parent)
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.hidden, args.heads, args.seq = 2, 64, 4, 64
    if args.rounds is None:
        args.rounds = 3 if args.tiny else 9
    try:
        args.parsed = [parse_setting(text) for text in args.settings.split(",") if text]
    except ValueError as exc:
        p.error(f"--settings {args.settings!r}: {exc}")
    if args.procs < 2:
        p.error(f"--procs {args.procs}: an all-reduce needs at least 2 ranks")
    return args


def parse_setting(text: str) -> tuple[bool, Optional[int]]:
    """"off" | "on" | "on:N" -> (overlap_grad_reduce, ddp_bucket_size)."""
    if text == "off":
        return False, None
    if text == "on":
        return True, None
    if text.startswith("on:") and text[3:].isdigit() and int(text[3:]) > 0:
        return True, int(text[3:])
    raise ValueError(f"{text!r} is not off, on or on:<positive bucket size in parameters>")


def setting_name(overlap: bool, bucket: Optional[int]) -> str:
    return "off" if not overlap else ("on" if bucket is None else f"on:{bucket}")


# ---- one rank -------------------------------------------------------------------------------

def measure_setting(args: argparse.Namespace, topo: Any, overlap: bool, bucket: Optional[int]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from chatforge_config.parallel import ModelConfig, OptimConfig, ParallelConfig
    from parallel.dist import device
    from parallel.engine import Engine
    from trainer.stages.pretrain import lm_forward

    model = ModelConfig(name="bench", num_layers=args.layers, hidden_size=args.hidden,
                        num_attention_heads=args.heads, seq_length=args.seq)
    par = ParallelConfig(overlap_grad_reduce=overlap, ddp_bucket_size=bucket)
    engine = Engine(model, par, topo, vocab_size=args.vocab, seed=1, optim=OptimConfig())
    ddp = engine.model[0]
    # The bench calls the sync itself (finalize_model_grads would also all-reduce the
    # layer-norm and embedding grads and divide by the token count: not DDP's all-reduce).
    engine.config.finalize_model_grads_func = None
    dev = device()
    sync: Callable[[], None] = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(1 + topo.dp_rank)
    micro = [{"tokens": torch.randint(0, args.vocab, (args.micro_batch, args.seq + 1), generator=gen)}]
    numel = sum(int(b.grad_data.numel()) for b in ddp.buffers)
    raw = torch.ones(numel, dtype=torch.float32, device=dev)
    buckets = sum(len(group.buckets) for group in ddp.bucket_groups)
    side = dist.new_group(backend="gloo")

    def step_fn(b: dict[str, torch.Tensor], m: torch.nn.Module) -> Any:
        return lm_forward(b, m, dev)

    def ddp_round() -> tuple[float, float]:
        ddp.zero_grad_buffer()
        dist.barrier()
        sync()
        began = time.perf_counter()
        engine._run(micro, step_fn, forward_only=False, seq_length=None)  # forward + backward
        sync()
        # Rank skew (one rank's backward ending later) is not the all-reduce's time. The
        # barrier runs on its own group: on the gradients' group it would queue behind (and
        # wait for) the buckets that overlap already launched.
        dist.barrier(group=side)
        started = time.perf_counter()
        ddp.finish_grad_sync()
        sync()
        ended = time.perf_counter()
        return ended - started, ended - began

    def sync_again() -> float:
        """Overlap off: DDP's all-reduce of the same buffer once more (no backward needed)."""
        dist.barrier(group=side)
        started = time.perf_counter()
        ddp.finish_grad_sync()
        sync()
        return time.perf_counter() - started

    def raw_round() -> float:
        dist.barrier(group=side)  # the same barrier as before DDP's sync: equal start skew
        sync()
        started = time.perf_counter()
        dist.all_reduce(raw)
        sync()
        return time.perf_counter() - started

    rounds = []
    for r in range(args.warmup + args.rounds):
        order = ("ddp", "raw") if r % 2 == 0 else ("raw", "ddp")
        found: dict[str, Any] = {}
        for kind in order:
            found[kind] = ddp_round() if kind == "ddp" else raw_round()
        pairs = [(found["ddp"][0], found["raw"])]
        for k in range(0 if overlap else args.inner - 1):  # more pairs, alternating, cheaply
            if k % 2:
                ddp_s = sync_again()
                pairs.append((ddp_s, raw_round()))
            else:
                raw_s = raw_round()
                pairs.append((sync_again(), raw_s))
        times = torch.tensor([found["ddp"][1], *[t for pair in pairs for t in pair]], dtype=torch.float64)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slowest rank's, outside the clocks
        if r >= args.warmup:
            step, flat = float(times[0]), times[1:].view(-1, 2).tolist()
            rounds.extend({"ddp_s": d, "raw_s": w, "step_s": step, "ratio": d / w, "first": order[0] if k == 0 else
                           ("ddp" if k % 2 == 0 else "raw")} for k, (d, w) in enumerate(flat))
    megabytes = numel * 4 / 1e6
    raw_s = statistics.median(r["raw_s"] for r in rounds)
    world = dist.get_world_size()
    del engine, ddp
    return {"setting": setting_name(overlap, bucket), "overlap_grad_reduce": overlap, "bucket_size": bucket,
            "buckets": buckets, "grad_elements": numel, "megabytes": megabytes,
            "median_ratio": statistics.median(r["ratio"] for r in rounds),
            "ddp_s": statistics.median(r["ddp_s"] for r in rounds), "raw_s": raw_s,
            "forward_backward_sync_s": statistics.median(r["step_s"] for r in rounds),
            # NCCL-tests' convention: bus bandwidth = size / time x 2 (n - 1) / n for all-reduce.
            "raw_bus_gb_per_s": megabytes / 1e3 / raw_s * 2 * (world - 1) / world,
            "rounds": rounds}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from chatforge_config.parallel import ModelConfig, ParallelConfig
    from parallel import cpu_compat
    from parallel.dist import init_distributed, local_env, shutdown
    from parallel.groups import init_groups

    env = local_env()
    init_distributed(env)
    cpu_compat.apply()
    topo = init_groups(ModelConfig(num_layers=args.layers, hidden_size=args.hidden,
                                   num_attention_heads=args.heads, seq_length=args.seq), ParallelConfig(), 1)
    results = []
    for overlap, bucket in args.parsed:
        results.append(measure_setting(args, topo, overlap, bucket))
        if env.rank == 0:
            r = results[-1]
            print(f"[ddp-allreduce] {r['setting']}: {r['buckets']} bucket(s), {r['megabytes']:.1f} MB; DDP "
                  f"{r['ddp_s'] * 1e3:.2f} ms, raw {r['raw_s'] * 1e3:.2f} ms, median ratio {r['median_ratio']:.3f} "
                  f"(rounds " + " ".join(f"{x['ratio']:.2f}" for x in r["rounds"]) + f"); forward+backward+sync "
                  f"{r['forward_backward_sync_s'] * 1e3:.1f} ms", flush=True)
    if env.rank == 0 and args.out is not None:
        head = results[0]
        report = {"bench": "ddp_allreduce", "command": "python -m tools.bench.ddp_allreduce " + args.command,
                  "procs": env.world_size, "backend": env.backend, "torch": torch.__version__,
                  "megabytes": head["megabytes"], "median_ratio": head["median_ratio"],
                  "raw_bus_gb_per_s": head["raw_bus_gb_per_s"], "settings": results}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    shutdown()


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    argv = list(argv if argv is not None else sys.argv[1:])
    args = parse_args(argv)
    if args.worker:
        args.command = os.environ.get("CHATFORGE_BENCH_COMMAND", "")
        worker(args)
        return {}
    from launcher.local import run_local

    with tempfile.TemporaryDirectory(prefix="chatforge-ddp-bench-") as tmp:
        out = args.out.resolve() if args.out is not None else Path(tmp) / "result.json"
        rest = [a for i, a in enumerate(argv) if a != "--out" and (i == 0 or argv[i - 1] != "--out")]
        command = [sys.executable, "-m", "tools.bench.ddp_allreduce", "--worker", *rest, "--out", str(out)]
        code = run_local(command, args.procs, Path(tmp), threads=args.threads,
                         env_extra={"PYTHONPATH": str(REPO), "CHATFORGE_BENCH_COMMAND": " ".join(argv)})
        if code != 0:
            raise SystemExit(f"ddp_allreduce: a rank failed with exit code {code}")
        return dict(json.loads(out.read_text()))


if __name__ == "__main__":
    main()
