"""Checkpoint I/O against raw file I/O of the same bytes, alternating in one process.

    python -m tools.bench.checkpoint_io [--hidden 512 --layers 4 --pairs 5 --out FILE]

- save: a full chatforge checkpoint (model + Adam state through megatron's torch_dist
  writer, train state, RNG, manifest with CRC32 of every file, fsync, rename, `latest`)
  versus writing the same number of bytes to one file and fsync'ing it. Reported as the
  throughput ratio ours / raw (goal >= 0.6).
- load: verifying the manifest and loading model + optimizer versus reading the same bytes
  back (both from the page cache: a container cannot drop caches).
- async: how long `save()` blocks the training loop with ckpt.async_save=true versus the
  whole sync save (goal <= 0.1).
Each measure is a median over `--pairs` A/B pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _raw_write(path: Path, payload: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _setup(args: argparse.Namespace, run_dir: Path) -> tuple[Any, Any]:
    from chatforge_config.trainer import Config
    from trainer import runtime

    cfg = OmegaConf.merge(OmegaConf.structured(Config), {
        "run": {"dir": str(run_dir)}, "logger": "none",
        "model": {"num_layers": args.layers, "hidden_size": args.hidden,
                  "num_attention_heads": 8, "seq_length": 128},
        "ckpt": {"keep": 1},
    })
    ctx = runtime.start(cfg)
    from parallel.engine import Engine

    engine = Engine(cfg.model, cfg.parallel, ctx.topo, vocab_size=8192, seed=1, optim=cfg.optim)
    from parallel.checkpoint import ensure_optimizer_state

    ensure_optimizer_state(engine)
    import torch

    for state in engine.optimizer.optimizer.state.values():
        # As after a first optimizer step (megatron drops a falsy step 0 from checkpoints).
        state["step"] = torch.tensor(1.0)
    return ctx, engine


def _payload(engine: Any) -> bytes:
    import torch

    tensors = [p.detach().reshape(-1) for p in engine.module.parameters()]
    for state in engine.optimizer.optimizer.state.values():
        tensors += [v.reshape(-1) for v in state.values() if isinstance(v, torch.Tensor) and v.numel() > 1]
    return torch.cat([t.float() for t in tensors]).numpy().tobytes()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--out", type=str, default="")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="chatforge-ckpt-bench-"))
    ctx, engine = _setup(args, root / "run")
    from trainer.checkpointing import Checkpointer, Resume

    checkpointer = Checkpointer(ctx)
    engines = {"model": engine}
    payload = _payload(engine)
    results: dict[str, list[float]] = {"save_ratio": [], "load_ratio": [], "async_blocked": []}
    step = 0
    for pair in range(args.pairs):
        step += 1
        ctx.cfg.ckpt.async_save = False
        ours = _timed(lambda: checkpointer.save(step, engines, {}))
        size = _dir_bytes(root / "run" / "checkpoints" / f"step_{step:06d}")
        raw_payload = payload[:size] if size <= len(payload) else payload + bytes(size - len(payload))
        raw = _timed(lambda: _raw_write(root / "raw.bin", raw_payload))
        results["save_ratio"].append(raw / ours)
        directory = root / "run" / "checkpoints" / f"step_{step:06d}"
        load = _timed(lambda: checkpointer.load(Resume(checkpointer.choose(directory), step, True), engines,
                                                _NoStage()))
        read = _timed(lambda: (root / "raw.bin").read_bytes())
        results["load_ratio"].append(read / load)
        step += 1
        ctx.cfg.ckpt.async_save = True
        blocked = _timed(lambda: checkpointer.save(step, engines, {}))
        checkpointer.wait()
        results["async_blocked"].append(blocked / ours)
        print(f"pair {pair + 1}/{args.pairs}: {size / 1e6:.1f} MB | save {ours:.3f}s raw {raw:.3f}s "
              f"ratio {raw / ours:.2f} | load {load:.3f}s read {read:.3f}s | async blocks {blocked:.3f}s "
              f"({blocked / ours:.2f} of sync)", flush=True)
    checkpointer.close()
    summary = {k: statistics.median(v) for k, v in results.items()}
    summary.update({"bytes": size, "pairs": args.pairs, "hidden": args.hidden, "layers": args.layers,
                    "raw": results})
    print(json.dumps({k: v for k, v in summary.items() if k != "raw"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    from trainer import runtime

    runtime.close(ctx)
    shutil.rmtree(root, ignore_errors=True)
    return summary


class _NoStage:
    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


if __name__ == "__main__":
    main()
