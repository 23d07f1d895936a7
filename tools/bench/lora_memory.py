"""Full fine-tuning against LoRA, and the recompute modes, measured in one process (not a test).

    python -m tools.bench.lora_memory [--layers 4 --hidden 256 --heads 8 --seq 256
        --micro-batch 2 --global-batch 4 --vocab 1024 --rank 16 --alpha 16
        --targets linear_qkv,linear_proj,linear_fc1,linear_fc2 --rounds 5 --steps-per-block 2
        --warmup 1 --threads 1 --recompute-num-layers 1 --no-recompute --keep --out FILE.json]

One process (one rank, gloo, CPU, fp32) builds engines of the same GPT from the same seed
(parallel.engine.Engine, as the stages do) and trains them on the same random tokens with
trainer.stages.pretrain.lm_forward:
  full            every parameter trains (parallel.recompute=none)
  lora            lora.rank/alpha/targets adapters on the frozen base (Engine(lora=...))
  full/selective  full fine-tuning, parallel.recompute=selective   (unless --no-recompute)
  full/full       full fine-tuning, parallel.recompute=full        (unless --no-recompute)

Measured for each engine, and reported as ratios LoRA / full:
  trainable params   Engine.parameter_count(trainable_only=True)
  optimizer bytes    the Adam state tensors (exp_avg, exp_avg_sq, step) after the timed steps
  grad buffer bytes  megatron DDP's contiguous grad buffers (grad_data of every buffer)
  checkpoint bytes   one save each (full first) through trainer.checkpointing.Checkpointer
                     (the trainer's save: megatron torch_dist shards of model + optimizer,
                     train state, RNG, config, lora.json, manifest); the step directory on
                     disk, and its shards/ alone. The save's time is reported too (one sample;
                     the writer service is started beforehand, as the trainer does).
  step time          median over rounds x steps-per-block optimizer steps after --warmup
                     steps; blocks of steps alternate between engines (order reversed every
                     round), so slow drifts of a shared machine hit every engine alike. Also
                     from process CPU time, which excludes time other processes took from us.
  activations        peak bytes of the tensors autograd keeps for backward during one
                     optimizer step (torch.autograd.graph.saved_tensors_hooks: distinct
                     storages, parameters excluded, counted until autograd frees them). A
                     proxy for activation memory: allocator overhead and transient buffers
                     are not in it. Next to it: the launcher plan's estimate for the same
                     shape (launcher/plan.py: activations of one micro batch + fp32 logits).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from omegaconf import OmegaConf

FULL, LORA = "full", "lora"
RECOMPUTE = {"full": "none", "lora": "none", "full/selective": "selective", "full/full": "full"}


# -- measuring ----------------------------------------------------------------------------
class SavedTensorPeak:
    """Live and peak bytes of the tensors autograd saves for backward (distinct storages,
    `excluded` storages, i.e. parameters, left out). A saved tensor counts from its pack
    until autograd drops the packed object (after the backward that used it)."""

    def __init__(self, excluded: set[int]) -> None:
        self.excluded = excluded
        self.live: dict[int, list[int]] = {}  # storage data_ptr -> [references, bytes]
        self.bytes = 0
        self.peak = 0

    class _Held:
        def __init__(self, owner: "SavedTensorPeak", tensor: torch.Tensor, key: Optional[int]) -> None:
            self.owner, self.tensor, self.key = owner, tensor, key

        def __del__(self) -> None:
            if self.key is not None:
                self.owner._release(self.key)

    def _pack(self, tensor: torch.Tensor) -> Any:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded or storage.nbytes() == 0:
            return SavedTensorPeak._Held(self, tensor, None)
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [1, storage.nbytes()]
            self.bytes += storage.nbytes()
            self.peak = max(self.peak, self.bytes)
        else:
            entry[0] += 1
        return SavedTensorPeak._Held(self, tensor, key)

    @staticmethod
    def _unpack(held: "SavedTensorPeak._Held") -> torch.Tensor:
        return held.tensor

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.bytes -= entry[1]
            del self.live[key]

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def optimizer_state_bytes(engine: Any) -> int:
    inner = engine.optimizer.optimizer
    return sum(_tensor_bytes(v) for state in inner.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


def grad_buffer_bytes(engine: Any) -> int:
    ddp = engine.model[0]
    return sum(_tensor_bytes(b.grad_data) for b in list(ddp.buffers) + list(ddp.expert_parallel_buffers))


def weight_bytes(engine: Any) -> int:
    return sum(_tensor_bytes(p) for p in engine.module.parameters())


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def plan_memory(cfg: Any, lora_rank: int) -> dict[str, Any]:
    """launcher/plan.py's estimate for this run's shape (per device, one micro batch)."""
    from launcher.plan import memory_per_device

    point = OmegaConf.merge(cfg, {"lora": {"rank": lora_rank}})
    mem = memory_per_device(point)
    return {"weights": mem.weights, "grads": mem.grads, "optimizer": mem.optimizer,
            "logits": mem.logits, "trainable_params": mem.trainable_params,
            "activations": {mode: size + mem.logits for mode, size in mem.activations.items()}}


# -- the run ------------------------------------------------------------------------------
def _config(args: argparse.Namespace, root: Path) -> Any:
    from chatforge_config.trainer import Config

    return OmegaConf.merge(OmegaConf.structured(Config), {
        "stage": {"name": "pretrain"}, "logger": "none", "seed": 1,
        "run": {"dir": str(root / FULL)},
        "cluster": {"threads_per_proc": args.threads, "nodes": 1, "procs_per_node": 1},
        "model": {"num_layers": args.layers, "hidden_size": args.hidden,
                  "num_attention_heads": args.heads, "seq_length": args.seq},
        "tokenizer": {"vocab_size": args.vocab},
        "train": {"micro_batch": args.micro_batch, "global_batch": args.global_batch},
        "parallel": {"recompute_num_layers": args.recompute_num_layers},
        "lora": {"rank": args.rank, "alpha": args.alpha, "targets": args.targets},
        "ckpt": {"keep": 1, "async_save": False},
    })


def _engines(cfg: Any, ctx: Any, names: list[str]) -> dict[str, Any]:
    from chatforge_config.parallel import LoRAConfig, ModelConfig, OptimConfig, ParallelConfig
    from parallel.engine import Engine

    model = ModelConfig(**OmegaConf.to_container(cfg.model))
    lora = LoRAConfig(**OmegaConf.to_container(cfg.lora))
    optim = OptimConfig(lr=1e-4, warmup_steps=0, decay="constant")
    engines = {}
    for name in names:
        parallel = ParallelConfig(recompute=RECOMPUTE[name],
                                  recompute_num_layers=int(cfg.parallel.recompute_num_layers))
        engines[name] = Engine(model, parallel, ctx.topo, int(cfg.tokenizer.vocab_size), seed=1,
                               optim=optim, total_steps=10**6, lora=lora if name == LORA else None)
    return engines


def _timed_step(step: Callable[[], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="chatforge-lora-bench-"))
    cfg = _config(args, root)
    from trainer import runtime
    from trainer.checkpointing import Checkpointer, _start_writer_service
    from trainer.stages.pretrain import lm_forward

    ctx = runtime.start(cfg)
    # Megatron's checkpoint writer service (a spawned Manager, seconds to start): the trainer
    # starts it while it builds its models (Checkpointer.__init__); start it here, before the
    # engines and the clocks, so that neither save below pays for it.
    _start_writer_service()
    names = [FULL, LORA] + ([] if args.no_recompute else ["full/selective", "full/full"])
    engines = _engines(cfg, ctx, names)
    dev = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.global_batch, args.seq + 1), generator=gen)
    batch = [{"tokens": tokens[i:i + args.micro_batch]} for i in range(0, args.global_batch, args.micro_batch)]
    steps = {name: (lambda e=e: e.train_step(batch, lambda b, m: lm_forward(b, m, dev)))
             for name, e in engines.items()}

    # Activations: one step each with the saved-tensor hooks (kept out of the timed steps).
    activations: dict[str, int] = {}
    losses: dict[str, float] = {}
    for name, engine in engines.items():
        excluded = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
        peak = SavedTensorPeak(excluded)
        with peak.hooks():
            losses[name] = steps[name]().loss
        activations[name] = peak.peak
        print(f"{name}: first loss {losses[name]:.4f}, peak saved-for-backward "
              f"{peak.peak / 2**20:.2f} MiB (live after the step: {peak.bytes} B)", flush=True)
    for _ in range(args.warmup - 1):
        for step in steps.values():
            step()

    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        order = names if r % 2 == 0 else list(reversed(names))
        block: dict[str, float] = {}
        for name in order:
            walls = []
            for _ in range(args.steps_per_block):
                wall, used = _timed_step(steps[name])
                walls.append(wall)
                times[name].append(wall)
                cpu[name].append(used)
            block[name] = statistics.mean(walls)
        rounds.append(block)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {block[n]:.3f}s" for n in names), flush=True)

    # One checkpoint each, through the trainer's save path.
    steps_done = args.warmup + args.rounds * args.steps_per_block
    checkpoints: dict[str, dict[str, float]] = {}
    for name in (FULL, LORA):
        engine = engines[name]
        if engine.lora is not None:
            # What the checkpoint's lora.json records; here the base is the seed's random init.
            engine.lora_base = {"dir": "(benchmark: random base, seed 1)", "source": "model", "keep_init": []}
        run_ctx = dataclasses.replace(ctx, run_dir=root / name)
        checkpointer = Checkpointer(run_ctx)
        started = time.perf_counter()
        checkpointer.save(steps_done, {"model": engine}, {})
        seconds = time.perf_counter() - started
        checkpointer.close()
        step_dir = root / name / "checkpoints" / f"step_{steps_done:06d}"
        checkpoints[name] = {"bytes": dir_bytes(step_dir), "shard_bytes": dir_bytes(step_dir / "shards"),
                             "save_s": seconds}
        print(f"{name}: checkpoint {checkpoints[name]['bytes'] / 2**20:.2f} MiB "
              f"(shards {checkpoints[name]['shard_bytes'] / 2**20:.2f} MiB), save {seconds:.2f}s", flush=True)

    per_engine: dict[str, dict[str, Any]] = {}
    for name, engine in engines.items():
        per_engine[name] = {
            "recompute": RECOMPUTE[name],
            "trainable_params": engine.parameter_count(trainable_only=True),
            "total_params": engine.parameter_count(),
            "weight_bytes": weight_bytes(engine),
            "grad_buffer_bytes": grad_buffer_bytes(engine),
            "optimizer_bytes": optimizer_state_bytes(engine),
            "step_s": statistics.median(times[name]),
            "step_cpu_s": statistics.median(cpu[name]),
            "peak_saved_activation_bytes": activations[name],
            "first_loss": losses[name],
        }
        if name in checkpoints:
            per_engine[name].update(checkpoint_bytes=checkpoints[name]["bytes"],
                                    checkpoint_shard_bytes=checkpoints[name]["shard_bytes"],
                                    checkpoint_save_s=checkpoints[name]["save_s"])
    full, lora = per_engine[FULL], per_engine[LORA]
    for entry in (full, lora):
        entry["model_state_bytes"] = entry["weight_bytes"] + entry["grad_buffer_bytes"] + entry["optimizer_bytes"]
    keys = ("trainable_params", "optimizer_bytes", "grad_buffer_bytes", "weight_bytes", "model_state_bytes",
            "checkpoint_bytes", "checkpoint_shard_bytes", "checkpoint_save_s", "step_s", "step_cpu_s",
            "peak_saved_activation_bytes")
    ratios = {k: lora[k] / full[k] for k in keys}
    round_ratios = [b[LORA] / b[FULL] for b in rounds]
    plan = {"full": plan_memory(cfg, 0), "lora": plan_memory(cfg, args.rank)}
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "tokens_per_step": args.global_batch * args.seq,
        "steps_timed": args.rounds * args.steps_per_block,
        "engines": per_engine,
        "lora_over_full": ratios,
        "step_ratio_per_round": round_ratios,
        "step_ratio_median_of_rounds": statistics.median(round_ratios),
        "recompute_over_none": {name: {"step_s": per_engine[name]["step_s"] / full["step_s"],
                                       "step_cpu_s": per_engine[name]["step_cpu_s"] / full["step_cpu_s"],
                                       "peak_saved_activation_bytes":
                                           per_engine[name]["peak_saved_activation_bytes"]
                                           / full["peak_saved_activation_bytes"]}
                                for name in names if name.startswith("full/")},
        "plan": plan,
        "step_times": times,
    }
    runtime.close(ctx)
    if args.keep:
        result["kept"] = str(root)
        print(f"checkpoints kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return result


# -- report ---------------------------------------------------------------------------------
def _mib(value: float) -> str:
    return f"{value / 2**20:,.2f} MiB"


def report(result: dict[str, Any]) -> str:
    e, r = result["engines"], result["lora_over_full"]
    full, lora = e[FULL], e[LORA]
    a = result["args"]
    lines = [f"model: {a['layers']} layers, hidden {a['hidden']}, {a['heads']} heads, seq {a['seq']}, "
             f"vocab {a['vocab']}, micro batch {a['micro_batch']}, global batch {a['global_batch']} "
             f"({result['tokens_per_step']} tokens/step), fp32, {a['threads']} thread(s); "
             f"LoRA r={a['rank']} alpha={a['alpha']} on {a['targets']}",
             "",
             f"| {'':<34} | {'full':>14} | {'LoRA':>14} | {'LoRA / full':>11} |",
             f"|{'-' * 36}|{'-' * 16}|{'-' * 16}|{'-' * 13}|"]

    def row(label: str, key: str, fmt: Callable[[float], str]) -> None:
        lines.append(f"| {label:<34} | {fmt(full[key]):>14} | {fmt(lora[key]):>14} | {r[key]:>11.4f} |")

    row("trainable params", "trainable_params", lambda v: f"{v:,.0f}")
    row("optimizer state (Adam)", "optimizer_bytes", _mib)
    row("grad buffer (DDP)", "grad_buffer_bytes", _mib)
    row("weights", "weight_bytes", _mib)
    row("weights + grads + optimizer", "model_state_bytes", _mib)
    row("checkpoint on disk (step dir)", "checkpoint_bytes", _mib)
    row("checkpoint shards/ only", "checkpoint_shard_bytes", _mib)
    row("checkpoint save time (1 save)", "checkpoint_save_s", lambda v: f"{v:.2f} s")
    row(f"step time, median of {result['steps_timed']}", "step_s", lambda v: f"{v:.3f} s")
    row("step CPU time, median", "step_cpu_s", lambda v: f"{v:.3f} s")
    row("peak saved-for-backward", "peak_saved_activation_bytes", _mib)
    lines.append(f"step time ratio per round: {' '.join(f'{x:.3f}' for x in result['step_ratio_per_round'])} "
                 f"(median {result['step_ratio_median_of_rounds']:.3f})")
    plan = result["plan"]
    lines += ["", "recompute (full fine-tuning):", "",
              f"| {'recompute':<10} | {'step time':>9} | {'vs none':>7} | {'CPU vs none':>11} | "
              f"{'peak saved-for-backward':>23} | {'vs none':>7} | {'plan: acts + logits':>19} |",
              f"|{'-' * 12}|{'-' * 11}|{'-' * 9}|{'-' * 13}|{'-' * 25}|{'-' * 9}|{'-' * 21}|"]
    for name, entry in e.items():
        if name == LORA:
            continue
        mode = entry["recompute"]
        lines.append(f"| {mode:<10} | {entry['step_s']:>7.3f} s | {entry['step_s'] / full['step_s']:>7.3f} | "
                     f"{entry['step_cpu_s'] / full['step_cpu_s']:>11.3f} | "
                     f"{_mib(entry['peak_saved_activation_bytes']):>23} | "
                     f"{entry['peak_saved_activation_bytes'] / full['peak_saved_activation_bytes']:>7.3f} | "
                     f"{_mib(plan['full']['activations'][mode]):>19} |")
    lines.append(f"LoRA, recompute none: peak saved-for-backward {_mib(lora['peak_saved_activation_bytes'])} "
                 f"(plan {_mib(plan['lora']['activations']['none'])})")
    lines.append(f"plan (launcher/plan.py) at this shape, full vs LoRA: grads {_mib(plan['full']['grads'])} vs "
                 f"{_mib(plan['lora']['grads'])}, optimizer {_mib(plan['full']['optimizer'])} vs "
                 f"{_mib(plan['lora']['optimizer'])}, trainable {plan['full']['trainable_params']:,} vs "
                 f"{plan['lora']['trainable_params']:,}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("layers", 4), ("hidden", 256), ("heads", 8), ("seq", 256), ("micro-batch", 2),
                          ("global-batch", 4), ("vocab", 1024), ("rank", 16), ("rounds", 5),
                          ("steps-per-block", 2), ("warmup", 1), ("threads", 1), ("recompute-num-layers", 1)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="linear_qkv,linear_proj,linear_fc1,linear_fc2")
    p.add_argument("--no-recompute", action="store_true", help="skip the selective/full recompute engines")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint directories")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.rank <= 0 or args.warmup < 1 or args.rounds < 1 or args.steps_per_block < 1:
        p.error("--rank, --warmup, --rounds and --steps-per-block must be >= 1")
    if args.global_batch % args.micro_batch:
        p.error("--micro-batch must divide --global-batch")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = measure(args)
    print(report(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
