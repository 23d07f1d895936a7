"""The one-command GPU benchmark: MFU, generation, RL iteration phases, communication.

    python -m tools.bench.gpu [--out gpu_bench.json]        # one NVIDIA GPU, a few minutes
    python -m tools.bench.gpu --tiny [--out tiny.json]      # CPU, gloo, fp32, tiny shapes

ONE process (world size 1; NCCL on a GPU, gloo on the CPU) measures, in this order:
  pretrain    tokens/s and MFU of pretraining the gpt_1p3b shape (conf/model/gpt_1p3b.yaml:
              24 layers, hidden 2048, 16 heads, seq 2048; vocab 50,304) in bf16 through
              parallel.engine.Engine and trainer.stages.pretrain.lm_forward, with the fastest
              layers available (parallel.layer_spec=te when transformer_engine imports, else
              the local spec with SDPA core attention), parallel.recompute=none then
              =selective. MFU follows PaLM (Chowdhery et al. 2022, appendix B): model FLOPs
              per token 6N + 12*L*H*Q*T (tools/bench/pretrain_throughput.model_flops_per_token),
              against the device's dense bf16 peak (PEAK_TFLOPS, or --peak-tflops). Should the
              te layers fail, the error is recorded (te_error) and the local spec measured;
  generation  tokens/s of KV-cache greedy decoding (trainer.generation.generate), batch 64, on
              a frozen bf16 engine of the same shape (the local spec, which the cache's tests use);
  grpo, ppo   one iteration of stage=grpo (critic-free; conf/stage/grpo.yaml) and stage=ppo
              (conf/stage/ppo.yaml) of a ~1B policy (the gpt_1p3b body with the small
              tokenizer vocabulary of the embedded prompts), the share of each phase:
              generation (sampling), scoring (the reward model), forwards (actor, reference,
              critic), training; from the stage's own timers (StepResult.extra generation_s,
              forward_s, train_s) with the scoring clock split out of generation_s. The policy
              and reward model are random weights written as checkpoints first (untimed):
              timing does not depend on what the weights say, and a random policy seldom
              samples a stop id, so responses run to about sampling.max_new_tokens tokens
              (near the worst case; the JSON has the mean response length);
  allreduce   with more than one GPU, tools.bench.ddp_allreduce on all of them (NCCL): the
              all-reduce bus bandwidth against DDP's per-step gradient all-reduce time of the
              same bytes; skipped on one GPU (the JSON says so).
Every phase frees its models before the next. On a GPU every clock read follows a
torch.cuda.synchronize(). The JSON (--out) holds every figure and `rows`: the lines for
docs/benchmarks.md. --tiny runs the same code on tiny shapes (the test suite runs it, so the
command cannot rot).
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendor's data sheets; the first
# name fragment found in torch.cuda.get_device_name() wins, so the specific ones come first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0),
)
RL_PHASES = ("generation", "scoring", "forwards", "training")


@dataclass
class Sizes:
    """What each section runs: the GPU defaults, or --tiny's."""

    model: dict[str, Any]  # ModelConfig fields of the pretrained / generating model
    vocab: int  # pretraining vocabulary (random tokens)
    micro_batch: int
    global_batch: int
    warmup: int
    steps: int
    precision: str
    gen_batch: int
    gen_prompt: int
    gen_new: int
    rl_model: dict[str, Any]  # the RL policy's shape (seq_length included)
    rl_vocab: int  # the tokenizer trained on the embedded prompts
    rl_new: int  # sampling.max_new_tokens
    grpo: dict[str, Any]  # overrides of the grpo run (on conf/stage/grpo.yaml)
    ppo: dict[str, Any]


def sizes(tiny: bool) -> Sizes:
    from omegaconf import OmegaConf

    if tiny:
        model = {"name": "tiny", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 128}
        rl = {"ppo": {"rollout_batch": 4}, "train": {"global_batch": 8, "micro_batch": 4},
              "sampling": {"batch": 8}}
        return Sizes(model, 512, 2, 4, 1, 2, "fp32", 64, 16, 8, model, 384, 16,
                     _merge(rl, {"ppo": {"n_samples_per_prompt": 2}}), _merge(rl, {"ppo": {"rollout_batch": 8, "epochs": 1}}))
    model = dict(OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "gpt_1p3b.yaml")))
    rl = {"train": {"global_batch": 32, "micro_batch": 8}, "sampling": {"batch": 64}}
    return Sizes(model, 50304, 4, 16, 3, 8, "bf16", 64, 128, 256, model, 1024, 256,
                 _merge(rl, {"ppo": {"rollout_batch": 16, "n_samples_per_prompt": 4}}),
                 _merge(rl, {"ppo": {"rollout_batch": 64, "epochs": 1}}))


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ---- the device -----------------------------------------------------------------------------------

class Clock:
    """perf_counter after waiting for the GPU (if any)."""

    def __init__(self) -> None:
        import torch

        self.sync: Callable[[], None] = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def device_info(peak_override: Optional[float]) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "device_count": 0, "peak_tflops": peak_override, "peak_source": "--peak-tflops"
                if peak_override else "none (CPU: no MFU)"}
    name = torch.cuda.get_device_name()
    peak, source = peak_override, "--peak-tflops"
    if peak is None:
        peak = peak_of(name)
        source = "PEAK_TFLOPS" if peak else f"unknown device {name!r}: give --peak-tflops"
    return {"device": name, "device_count": torch.cuda.device_count(), "peak_tflops": peak, "peak_source": source}


def peak_of(device_name: str) -> Optional[float]:
    """Dense bf16 TFLOP/s of a device by its torch.cuda.get_device_name(); None if unknown."""
    return next((tflops for fragment, tflops in PEAK_TFLOPS if fragment in device_name), None)


def peak_memory_gb() -> Optional[float]:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def release() -> None:
    """Free the previous section's models before the next is built."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def fastest_layer_spec() -> tuple[str, str]:
    """-> (parallel.layer_spec, why): Transformer Engine's layers on a GPU where it imports."""
    import torch

    if not torch.cuda.is_available():
        return "local", "CPU: the local spec with SDPA core attention"
    try:
        import transformer_engine  # noqa: F401
    except Exception as exc:  # ImportError, or a broken build that fails on import
        return "local", f"transformer_engine not importable ({type(exc).__name__}): local spec, SDPA attention"
    return "te", "transformer_engine importable: Transformer Engine layers (fused attention)"


# ---- pretraining MFU ------------------------------------------------------------------------------

def pretrain(ctx: Any, s: Sizes, peak: Optional[float], recompute: str, layer_spec: str) -> dict[str, Any]:
    import torch

    from chatforge_config.parallel import ModelConfig, OptimConfig, ParallelConfig
    from parallel.engine import Engine
    from tools.bench.pretrain_throughput import Shape, model_flops_per_token
    from trainer.stages.pretrain import lm_forward

    model = ModelConfig(**s.model)
    par = ParallelConfig(precision=s.precision, recompute=recompute, layer_spec=layer_spec)
    engine = Engine(model, par, ctx.topo, vocab_size=s.vocab, seed=1, optim=OptimConfig(warmup_steps=0, decay="constant"),
                    total_steps=s.warmup + s.steps)
    seq = model.seq_length
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, s.vocab, (s.global_batch, seq + 1), generator=gen)
    micro = [{"tokens": batch[i:i + s.micro_batch]} for i in range(0, s.global_batch, s.micro_batch)]

    def step_fn(b: dict[str, torch.Tensor], m: torch.nn.Module) -> Any:
        return lm_forward(b, m, ctx.device)

    clock = Clock()
    for _ in range(s.warmup):
        engine.train_step(micro, step_fn)
    times, losses = [], []
    for _ in range(s.steps):
        started = clock.now()
        losses.append(engine.train_step(micro, step_fn).loss)
        times.append(clock.now() - started)
    params = engine.parameter_count()
    shape = Shape(model.num_layers, model.hidden_size, model.num_attention_heads, seq, s.micro_batch,
                  s.global_batch, s.vocab)
    flops = model_flops_per_token(shape, params)
    step_s = statistics.median(times)
    tokens_per_s = s.global_batch * seq / step_s
    achieved = tokens_per_s * flops / 1e12
    del engine
    return {"recompute": recompute, "step_s": step_s, "step_times_s": times, "tokens_per_s": tokens_per_s,
            "model_tflops": achieved, "mfu": achieved / peak if peak else None, "parameters": params,
            "flops_per_token": flops, "final_loss": losses[-1], "peak_memory_gb": peak_memory_gb()}


def pretrain_section(ctx: Any, s: Sizes, peak: Optional[float], layer_spec: str, why: str) -> dict[str, Any]:
    """Recompute none, then selective. Transformer Engine's layers were never run by our
    tests (no GPU in CI): if they fail, the error is recorded and the local spec measured."""
    runs: list[dict[str, Any]] = []
    error = None
    for recompute in ("none", "selective"):
        try:
            runs.append(pretrain(ctx, s, peak, recompute, layer_spec))
        except Exception as exc:
            if layer_spec == "local":
                raise
            error, layer_spec = f"{type(exc).__name__}: {exc}", "local"
            why = f"parallel.layer_spec=te failed ({error}); measured the local spec instead"
            print(f"[gpu-bench] {why}", flush=True)
            release()
            runs = [pretrain(ctx, s, peak, r, layer_spec) for r in ("none", "selective")[:len(runs) + 1]]
        release()
        print(f"[gpu-bench] pretrain recompute={recompute}: {runs[-1]['tokens_per_s']:,.0f} tokens/s, "
              f"MFU {runs[-1]['mfu']}", flush=True)
    return {"model": s.model["name"], "shape": s.model, "vocab": s.vocab, "precision": s.precision,
            "layer_spec": layer_spec, "layer_spec_reason": why, "te_error": error, "micro_batch": s.micro_batch,
            "global_batch": s.global_batch, "timed_steps": s.steps, "runs": runs}


# ---- generation -----------------------------------------------------------------------------------

def generation(ctx: Any, s: Sizes, layer_spec: str) -> dict[str, Any]:
    import torch

    from chatforge_config.parallel import ModelConfig, ParallelConfig
    from parallel.engine import Engine
    from trainer.generation import SamplingConfig, generate

    model = ModelConfig(**s.model)
    par = ParallelConfig(precision=s.precision, layer_spec=layer_spec)
    engine = Engine(model, par, ctx.topo, vocab_size=s.vocab, seed=1)  # frozen: forward memory only
    gen = torch.Generator().manual_seed(2)
    prompts = torch.randint(5, s.vocab, (s.gen_batch, s.gen_prompt), generator=gen).tolist()
    sampling = SamplingConfig(max_new_tokens=s.gen_new, temperature=0.0, use_cache=True)
    clock = Clock()
    times = []
    for _ in range(3):  # the first is a warm-up (allocations, kernels' first calls)
        started = clock.now()
        out = generate(engine, prompts, sampling, stop_ids=set(), pad_id=0, seed=1, vocab_size=s.vocab)
        times.append(clock.now() - started)
    assert all(len(t) == s.gen_new for t in out.tokens), "a row stopped early without a stop id"
    seconds = statistics.median(times[1:])
    del engine
    return {"batch": s.gen_batch, "prompt_tokens": s.gen_prompt, "new_tokens": s.gen_new, "seconds": seconds,
            "tokens_per_s": s.gen_batch * s.gen_new / seconds, "decode_step_ms": 1000 * seconds / s.gen_new,
            "peak_memory_gb": peak_memory_gb()}


# ---- RL iterations ----------------------------------------------------------------------------------

def rl_config(stage: str, s: Sizes, work: Path, overrides: dict[str, Any]) -> Any:
    """The trainer config of one RL run: schema defaults, conf/stage/<stage>.yaml (the preset a
    user gets), then the benchmark's sizes."""
    from omegaconf import OmegaConf

    from chatforge_config.trainer import Config

    preset = OmegaConf.load(REPO / "conf" / "stage" / f"{stage}.yaml")
    ours = _merge({"logger": "none", "seed": 1, "model": dict(s.rl_model),
                   "parallel": {"precision": s.precision},
                   "tokenizer": {"vocab_size": s.rl_vocab}, "run": {"dir": str(work / stage)},
                   "train": {"steps": 10, "eval_every": 0},
                   "sampling": {"max_new_tokens": s.rl_new}}, overrides)
    return OmegaConf.merge(OmegaConf.structured(Config), preset, OmegaConf.create(ours))


def write_random_runs(ctx: Any, s: Sizes, work: Path) -> tuple[Path, Path]:
    """A policy run (LM head) and a reward-model run (scalar head) with random weights, as
    checkpoints the RL stages load (ckpt.load, ppo.reward), and the tokenizer trained on the
    embedded prompts (prepare_rl_prompts, as the stages themselves would)."""
    from omegaconf import OmegaConf

    from parallel.engine import Engine
    from trainer.checkpointing import Checkpointer
    from trainer.data.chat_prepare import prepare_rl_prompts
    from trainer.data.tokenizer import Tokenizer

    runs = []
    for name, head in (("policy", "lm"), ("reward", "scalar")):
        cfg = rl_config("ppo", s, work, {"model": {"head": head}, "run": {"dir": str(work / name)}})
        run = replace(ctx, cfg=cfg, run_dir=work / name)
        tok_path = prepare_rl_prompts(run)[0] if head == "lm" else runs[0][1]
        run.tokenizer_path = tok_path
        engine = Engine(cfg.model, cfg.parallel, ctx.topo, vocab_size=Tokenizer(tok_path).vocab_size, seed=7)
        checkpointer = Checkpointer(run)
        checkpointer.save(0, {"model": engine}, stage_state={})
        checkpointer.close()
        runs.append((work / name, tok_path))
        del engine
        OmegaConf.save(cfg, work / name / "config.yaml")
    release()
    return runs[0][0], runs[1][0]


class TimedReward:
    """The stage's RewardFunction with a clock around each scoring call (sampling and scoring
    share the stage's generation_s timer; this splits them)."""

    def __init__(self, inner: Any, clock: Clock) -> None:
        self.inner, self.clock, self.seconds = inner, clock, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = self.clock.now()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += self.clock.now() - started

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def rl_iteration(ctx: Any, s: Sizes, work: Path, stage_name: str, policy: Path, reward: Path,
                 iterations: int) -> dict[str, Any]:
    from trainer.checkpointing import load_weights
    from trainer.stages import build_stage

    overrides = _merge(getattr(s, stage_name), {"ckpt": {"load": str(policy)}, "ppo": {"reward": str(reward)}})
    cfg = rl_config(stage_name, s, work, overrides)
    run = replace(ctx, cfg=cfg, run_dir=work / stage_name)
    stage = build_stage(run)
    load_weights(str(cfg.ckpt.load), {"model": stage.actor}, cfg.model, sources=stage.load_sources())
    clock = Clock()
    stage.reward = timed = TimedReward(stage.reward, clock)
    rounds = []
    for step in range(1 + iterations):  # the first iteration is a warm-up
        timed.seconds = 0.0
        started = clock.now()
        result = stage.train_step(step)
        wall = clock.now() - started
        extra = result.extra
        phases = {"generation": extra["generation_s"] - timed.seconds, "scoring": timed.seconds,
                  "forwards": extra["forward_s"], "training": extra["train_s"]}
        rounds.append({"iteration_s": wall, "phases_s": phases,
                       "response_length": float(result.metrics.get("response_length", float("nan")))})
    timed_rounds = rounds[1:]
    med = statistics.median
    phase_s = {k: med(r["phases_s"][k] for r in timed_rounds) for k in RL_PHASES}
    total = sum(phase_s.values())
    responses = int(cfg.ppo.rollout_batch) * int(cfg.ppo.n_samples_per_prompt)
    out = {"stage": stage_name, "advantage_estimator": str(cfg.ppo.advantage_estimator),
           "critic": stage.critic is not None, "parameters": stage.actor.parameter_count(),
           "vocab": stage.tok.vocab_size, "responses": responses, "max_new_tokens": int(cfg.sampling.max_new_tokens),
           "optimizer_steps": stage.updates_per_iteration, "iteration_s": med(r["iteration_s"] for r in timed_rounds),
           "phase_s": phase_s, "shares": {k: v / total for k, v in phase_s.items()},
           "rollout_share": (phase_s["generation"] + phase_s["scoring"]) / total,
           "response_length": med(r["response_length"] for r in timed_rounds),
           "peak_memory_gb": peak_memory_gb(), "rounds": rounds}
    del stage
    release()
    return out


# ---- communication ----------------------------------------------------------------------------------

def allreduce(info: dict[str, Any], tiny: bool, work: Path) -> dict[str, Any]:
    """tools.bench.ddp_allreduce over every GPU (its own processes and NCCL groups)."""
    count = int(info["device_count"])
    if count < 2:
        return {"skipped": f"{count} GPU(s): an all-reduce needs at least 2 (run this on a multi-GPU node)"}
    out = work / "allreduce.json"
    command = [sys.executable, "-m", "tools.bench.ddp_allreduce", "--backend", "nccl", "--procs", str(count),
               "--out", str(out)]
    if tiny:
        command.append("--tiny")
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return dict(json.loads(out.read_text()))


# ---- report -------------------------------------------------------------------------------------------

def rows(report: dict[str, Any]) -> list[str]:
    """The lines for docs/benchmarks.md's GPU table."""
    dev, date = report["device"], time.strftime("%Y-%m-%d", time.gmtime())
    found = []
    for run in report["pretrain"]["runs"]:
        mfu = f"{run['mfu']:.1%}" if run["mfu"] is not None else "n/a (no peak)"
        found.append(f"| {dev} | pretrain {report['pretrain']['model']}, {report['pretrain']['precision']}, "
                     f"{report['pretrain']['layer_spec']}, recompute={run['recompute']} | "
                     f"{run['tokens_per_s']:,.0f} tokens/s, {run['model_tflops']:.3g} TFLOP/s | **MFU {mfu}** | {date} |")
    g = report["generation"]
    found.append(f"| {dev} | KV-cache generation, batch {g['batch']}, {g['prompt_tokens']} + {g['new_tokens']} tokens | "
                 f"{g['tokens_per_s']:,.0f} tokens/s | {g['decode_step_ms']:.1f} ms per decode step | {date} |")
    for name in ("grpo", "ppo"):
        r = report[name]
        shares = ", ".join(f"{k} {v:.0%}" for k, v in r["shares"].items())
        found.append(f"| {dev} | one {name} iteration, {r['responses']} responses x {r['max_new_tokens']} tokens, "
                     f"{r['optimizer_steps']} optimizer step(s) | {r['iteration_s']:.2f} s: {shares} | "
                     f"**rollout share {r['rollout_share']:.0%}** | {date} |")
    a = report["allreduce"]
    if "skipped" in a:
        found.append(f"| {dev} | all-reduce bus bandwidth vs DDP | skipped: {a['skipped']} | | {date} |")
    else:
        found.append(f"| {dev} | all-reduce {a['megabytes']:.0f} MB over {a['procs']} GPUs | bus bandwidth "
                     f"{a['raw_bus_gb_per_s']:.1f} GB/s | DDP / raw time **{a['median_ratio']:.2f}** | {date} |")
    return found


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes, fp32: runs on a CPU in about a minute")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (overrides the table)")
    p.add_argument("--rl-iterations", type=int, default=1, help="timed iterations per RL stage (after one warm-up)")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out: pretrain,generation,rl,allreduce")
    p.add_argument("--work-dir", type=Path, default=None, help="checkpoints and runs here (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    if args.rl_iterations < 1:
        p.error(f"--rl-iterations {args.rl_iterations}: must be >= 1")
    unknown = set(filter(None, args.skip.split(","))) - {"pretrain", "generation", "rl", "allreduce"}
    if unknown:
        p.error(f"--skip: unknown section(s) {sorted(unknown)}")
    return args


def start(s: Sizes, threads: int) -> Any:
    """One rank (whatever launched us), its process group and TP1/PP1 groups."""
    from omegaconf import OmegaConf

    from chatforge_config.trainer import Config
    from trainer import runtime

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        os.environ.pop(name, None)
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(
        {"logger": "none", "model": dict(s.model), "cluster": {"threads_per_proc": threads}}))
    return runtime.start(cfg)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    began = time.perf_counter()
    skip = set(filter(None, args.skip.split(",")))
    s = sizes(args.tiny)
    ctx = start(s, 1 if args.tiny else max(1, os.cpu_count() or 1))
    import torch

    # Its distribution's version: parallel/ is the only importer of megatron.
    megatron_core = importlib.metadata.version("megatron-core")
    info = device_info(args.peak_tflops)
    if s.precision == "bf16" and not torch.cuda.is_available():
        raise SystemExit("python -m tools.bench.gpu: no CUDA device; run with --tiny on a CPU")
    layer_spec, why = fastest_layer_spec()
    print(f"[gpu-bench] {info['device']} ({info['device_count']} GPU(s)), peak {info['peak_tflops']} TFLOP/s "
          f"({info['peak_source']}); torch {torch.__version__}, megatron-core {megatron_core}; {why}",
          flush=True)
    root = args.work_dir.resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="chatforge-gpu-bench-"))
    report: dict[str, Any] = {"bench": "gpu", "command": " ".join(["python -m tools.bench.gpu", *(
        argv if argv is not None else sys.argv[1:])]), "tiny": args.tiny, **info, "torch": torch.__version__,
        "megatron_core": megatron_core}
    try:
        if "pretrain" not in skip:
            report["pretrain"] = pretrain_section(ctx, s, info["peak_tflops"], layer_spec, why)
        if "generation" not in skip:
            # The local spec: the KV-cache path (parallel/inference.py) is tested with it.
            report["generation"] = generation(ctx, s, "local")
            release()
            print(f"[gpu-bench] generation: {report['generation']['tokens_per_s']:,.0f} tokens/s", flush=True)
        if "rl" not in skip:
            policy, reward = write_random_runs(ctx, s, root)
            for name in ("grpo", "ppo"):
                report[name] = rl_iteration(ctx, s, root, name, policy, reward, args.rl_iterations)
                print(f"[gpu-bench] {name}: {report[name]['iteration_s']:.2f} s, shares "
                      + ", ".join(f"{k} {v:.1%}" for k, v in report[name]["shares"].items()), flush=True)
        if "allreduce" not in skip:
            report["allreduce"] = allreduce(info, args.tiny, root)
    finally:
        from trainer import runtime

        runtime.close(ctx)
        if args.work_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    report["seconds"] = time.perf_counter() - began
    if not skip:
        report["rows"] = rows(report)
        print("\n".join(report["rows"]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"[gpu-bench] done in {report['seconds']:.0f} s", flush=True)
    return report


if __name__ == "__main__":
    main()
