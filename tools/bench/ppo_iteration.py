"""One PPO iteration against the sum of its phases run alone, in one process (not a test).

    python -m tools.bench.ppo_iteration [--model tiny|small --stage ppo|a2c|grpo|rloo|reinforce_pp
        --rollout-batch 16 --samples 1 --epochs 2 --iterations 7 --warmup 2 --threads 1
        --work-dir DIR --out FILE.json]
    (--layers/--hidden/--heads/--seq/--vocab override the preset's shape)

Preparation (untimed). The trainer itself (`python -m trainer <run>/config.yaml` through
launcher.local.run_local, one rank, as tests/conftest.py does) trains, in a temporary
directory or --work-dir:
  sft  stage=sft from random weights on the embedded conversations (--sft-steps, 60), which
       also trains the tokenizer (--vocab);
  rm   stage=rm, model.head=scalar, ckpt.load=<sft>, data.embedded.prefer=brief (--rm-steps, 30).
With --work-dir, a run whose config is unchanged and which has a checkpoint is reused.

Measurement. In this process (world size 1, gloo on CPU; any RANK/WORLD_SIZE/SLURM_* of
the caller is removed so trainer.runtime.start starts a single rank) the RL stage is built from
stage.name=ppo (or --stage: a2c, or a critic-free method with its preset's loss settings,
METHODS), ckpt.load=<sft>, ppo.reward=<rm> (the only reward source), ppo.rollout_batch=16
(--rollout-batch) prompts x --samples responses, ppo.epochs=--epochs,
sampling.max_new_tokens=24, sampling.batch=16, train.global_batch=8, train.micro_batch=4,
logger=none (the actor's weights are loaded from <sft> as the training loop does). Then
--warmup untimed iterations, then --iterations rounds. Each round measures, on the same
stage object:
  iteration  the wall time of `stage.train_step(step)`: prompts, rollout, advantages and
             metrics, the update (what the training loop times as step_time_s);
  phases     the same work with a clock around each phase, nothing else in the timers
             (taking the prompts, the seed and the list building stay outside them):
               generation  stage.collect: sampling with the actor's KV cache, then the
                           reward sources (the reward model's forward)
               forwards    stage.score_rollout (actor, reference, critic)
               advantages  trainer.advantages.add_advantages + the gold reward + rollout_metrics
               training    stage._update (PPO: ppo.epochs x rollout/global_batch optimizer
                           steps of the actor and of the critic; A2C: one of each)
The ratio iteration / sum(phases) is taken within the round (goal <= 1.10), as are the
shares of each phase in sum(phases); the headline is the median over rounds. Process CPU
time is measured alongside (on a shared machine it excludes other processes' time).

Comparable work. Both measurements of a round get the same step index (hence the same
sampling seeds and minibatch order) and the same prompts: the prompt sampler is rewound to
where it stood before the first of the two. They cannot see the same weights, since each
ends with an optimizer update: the second of the two runs on the weights after one more
iteration. So the order alternates between rounds (iteration first in rounds 1, 3, 5, ...,
phases first in the others), and the mean response length of both is printed per round:
generation, the forwards and the update all depend on it (rows are padded to the rollout's
longest, trainer/rollout.py; the "fill" printed is the share of model.seq_length rows that
holds tokens, i.e. what padding to model.seq_length would waste). The adaptive KL controller is
updated in both, as train_step does (a no-op at ppo.kl_target=0).

On a GPU the clock reads are preceded by torch.cuda.synchronize().
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
PRESETS: dict[str, dict[str, int]] = {
    # Python dispatch dominates at this size: a check of the stage's own overhead.
    "tiny": {"layers": 2, "hidden": 64, "heads": 4, "seq": 96, "vocab": 384},
    # Compute dominates (as in tools/bench/post_training.py and generation.py).
    "small": {"layers": 4, "hidden": 256, "heads": 8, "seq": 256, "vocab": 1024},
}
PHASES = ("generation", "forwards", "advantages", "training")
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


# ---- configuration ----------------------------------------------------------------------------

def model_config(args: argparse.Namespace) -> dict[str, Any]:
    return {"num_layers": args.layers, "hidden_size": args.hidden, "num_attention_heads": args.heads,
            "seq_length": args.seq}


def sft_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"logger": "none", "seed": args.seed, "stage": {"name": "sft"}, "model": model_config(args),
            "tokenizer": {"vocab_size": args.vocab},
            "train": {"steps": args.sft_steps, "global_batch": 8, "micro_batch": 8, "eval_every": 0},
            "optim": {"lr": 2e-3, "warmup_steps": 5},
            "data": {"embedded": {"num_chats": 1000, "prefer": "brief"}}, "ckpt": {"keep": 1}}


def rm_overrides(args: argparse.Namespace, sft: Path) -> dict[str, Any]:
    return {"logger": "none", "seed": args.seed, "stage": {"name": "rm"},
            "model": {**model_config(args), "head": "scalar"},
            "train": {"steps": args.rm_steps, "global_batch": 8, "micro_batch": 8, "eval_every": 0},
            "optim": {"lr": 1e-3, "warmup_steps": 3},
            "data": {"embedded": {"num_pairs": 1000, "prefer": "brief"}},
            "ckpt": {"load": str(sft), "keep": 1}}


# The critic-free methods as their conf/stage presets set them (rollout size and epochs are the
# bench's own: --rollout-batch, --samples, --epochs).
METHODS: dict[str, dict[str, Any]] = {
    "ppo": {}, "a2c": {},
    "grpo": {"advantage_estimator": "grpo", "kl_in": "loss", "kl_estimator": "k3", "kl_coef": 0.04,
             "loss_agg": "seq_mean_token_mean"},
    "rloo": {"advantage_estimator": "rloo"},
    "reinforce_pp": {"advantage_estimator": "reinforce_pp", "kl_coef": 0.01},
}


def ppo_overrides(args: argparse.Namespace, run_dir: Path, sft: Path, rm: Path) -> dict[str, Any]:
    iterations = args.warmup + 2 * args.iterations  # train.steps: the LR schedule's length
    method = {**METHODS[args.stage], "n_samples_per_prompt": args.samples, "rollout_batch": args.rollout_batch,
              "epochs": args.epochs}
    return {"logger": "none", "seed": args.seed, "stage": {"name": args.stage}, "model": model_config(args),
            "run": {"dir": str(run_dir)}, "cluster": {"threads_per_proc": args.threads},
            "train": {"steps": iterations, "global_batch": 8, "micro_batch": 4, "eval_every": 0},
            "optim": {"lr": 1e-5, "warmup_steps": 0, "decay": "constant"},
            "data": {"embedded": {"prefer": "brief"}},
            "ckpt": {"load": str(sft)},
            "ppo": {"reward": str(rm), "reward_funcs": ["rm"], **method},
            "sampling": {"max_new_tokens": 24, "batch": 16}}


def resolved_yaml(run_dir: Path, overrides: dict[str, Any]) -> str:
    """The resolved trainer config the launcher would write (schema defaults + overrides)."""
    from omegaconf import OmegaConf

    from chatforge_config.trainer import Config

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(overrides))
    cfg.run.dir = str(run_dir)
    return OmegaConf.to_yaml(cfg, resolve=True)


def train_run(run_dir: Path, overrides: dict[str, Any], threads: int) -> float:
    """Run `python -m trainer` (one rank) unless `run_dir` already holds a finished run of
    this very config; return the seconds it took (0 when reused)."""
    from launcher.local import run_local

    text = resolved_yaml(run_dir, overrides)
    config = run_dir / "config.yaml"
    if (run_dir / "checkpoints" / "latest").is_file() and config.is_file() and config.read_text() == text:
        print(f"[bench] reusing {run_dir}", flush=True)
        return 0.0
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config.write_text(text)
    started = time.perf_counter()
    code = run_local([sys.executable, "-m", "trainer", str(config)], 1, run_dir,
                     env_extra={"PYTHONPATH": str(REPO)}, threads=threads)
    if code != 0:
        raise SystemExit(f"preparation failed: trainer exit code {code}; see {run_dir}/logs")
    return time.perf_counter() - started


# ---- the stage in this process ------------------------------------------------------------------

def build_stage(args: argparse.Namespace, run_dir: Path, sft: Path, rm: Path) -> tuple[Any, Any]:
    from omegaconf import OmegaConf

    from chatforge_config.trainer import Config
    from trainer import runtime
    from trainer.checkpointing import load_weights
    from trainer.stages import build_stage as make

    for name in RANK_VARIABLES:
        os.environ.pop(name, None)  # one rank, whatever launched us
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: nothing to resume
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(ppo_overrides(args, run_dir, sft, rm)))
    ctx = runtime.start(cfg)
    stage = make(ctx)
    # What the training loop's resume does for a new run with ckpt.load: the actor from the
    # SFT checkpoint (the stage itself loads the reference, the critic and the reward model).
    load_weights(str(cfg.ckpt.load), {"model": stage.actor}, cfg.model, sources=stage.load_sources())
    return ctx, stage


class Clock:
    """Wall and process CPU time; synchronises the GPU, if any, before each read."""

    def __init__(self) -> None:
        import torch

        self.sync: Callable[[], None] = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def now(self) -> tuple[float, float]:
        self.sync()
        return time.perf_counter(), time.process_time()


def _minus(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return a[0] - b[0], a[1] - b[1]


def run_iteration(stage: Any, step: int, clock: Clock) -> dict[str, Any]:
    """The whole iteration, as the training loop runs it."""
    started = clock.now()
    result = stage.train_step(step)
    wall, cpu = _minus(clock.now(), started)
    own = {k: float(result.extra[k]) for k in ("generation_s", "forward_s", "train_s")}
    return {"wall": wall, "cpu": cpu, "own_seconds": own,
            "response_length": float(result.metrics["response_length"])}


def run_phases(stage: Any, step: int, clock: Clock) -> dict[str, Any]:
    """train_step's work (trainer/stages/ppo.py), one clock per phase."""
    from trainer.advantages import add_advantages
    from trainer.rollout import rollout_metrics

    ppo = stage.cfg.ppo
    times: dict[str, tuple[float, float]] = {}

    t0 = clock.now()
    collected, _ = stage.collect(step)
    t1 = clock.now()
    times["generation"] = _minus(t1, t0)

    t0 = clock.now()
    rollout = stage.score_rollout(collected)
    t1 = clock.now()
    times["forwards"] = _minus(t1, t0)

    t0 = clock.now()
    add_advantages(rollout, stage.advantage_settings(), stage._dp_sum)
    gold = stage._gold([stage.train_items[i][0] for i in rollout.prompt_index], rollout.responses)
    metrics = rollout_metrics(rollout, stage.ctx.topo.dp_group, gold)
    t1 = clock.now()
    times["advantages"] = _minus(t1, t0)

    t0 = clock.now()
    stage._update(rollout, step)
    t1 = clock.now()
    times["training"] = _minus(t1, t0)
    stage.kl.update(metrics["kl"], int(ppo.rollout_batch) * stage.group)
    prompts = [stage.train_ids[i] for i in rollout.prompt_index]
    rows = len(prompts) * int(stage.cfg.model.seq_length)
    used = sum(len(p) + len(r) for p, r in zip(prompts, rollout.responses)) / rows
    return {"wall": {k: v[0] for k, v in times.items()}, "cpu": {k: v[1] for k, v in times.items()},
            "response_length": float(metrics["response_length"]), "row_fill": used}


def measure(args: argparse.Namespace, stage: Any) -> dict[str, Any]:
    clock = Clock()
    step = 0
    for _ in range(args.warmup):  # first-call paths, allocations, the KV cache's buffers
        run_iteration(stage, step, clock)
        step += 1
    rounds: list[dict[str, Any]] = []
    for r in range(args.iterations):
        order = ("iteration", "phases") if r % 2 == 0 else ("phases", "iteration")
        rewind = stage.prompts.consumed
        found: dict[str, Any] = {}
        for kind in order:
            stage.prompts.consumed = rewind  # the same prompts for both
            found[kind] = (run_iteration if kind == "iteration" else run_phases)(stage, step, clock)
        step += 1
        it, ph = found["iteration"], found["phases"]
        total, total_cpu = sum(ph["wall"].values()), sum(ph["cpu"].values())
        row = {"order": order[0], "iteration_s": it["wall"], "iteration_cpu_s": it["cpu"],
               "phases_s": ph["wall"], "phases_cpu_s": ph["cpu"], "sum_phases_s": total,
               "ratio": it["wall"] / total, "ratio_cpu": it["cpu"] / total_cpu,
               "shares": {k: v / total for k, v in ph["wall"].items()},
               "iteration_own_generation_share": it["own_seconds"]["generation_s"] / sum(it["own_seconds"].values()),
               "iteration_own_s": it["own_seconds"],
               "response_length": {"iteration": it["response_length"], "phases": ph["response_length"]},
               "row_fill": ph["row_fill"]}
        rounds.append(row)
        print(f"round {r + 1}/{args.iterations} ({order[0]} first): iteration {it['wall']:.3f}s, phases "
              + " + ".join(f"{k} {v:.3f}" for k, v in ph["wall"].items())
              + f" = {total:.3f}s; ratio {row['ratio']:.3f} (CPU {row['ratio_cpu']:.3f}); train_step's own "
              + " + ".join(f"{v:.3f}" for v in it["own_seconds"].values())
              + f"; mean response length {it['response_length']:.1f} / {ph['response_length']:.1f}", flush=True)
    med = statistics.median
    return {
        "ratio": med(r["ratio"] for r in rounds),
        "ratio_cpu": med(r["ratio_cpu"] for r in rounds),
        "generation_share": med(r["shares"]["generation"] for r in rounds),
        "iteration_own_generation_share": med(r["iteration_own_generation_share"] for r in rounds),
        "shares": {k: med(r["shares"][k] for r in rounds) for k in PHASES},
        "iteration_s": med(r["iteration_s"] for r in rounds),
        "response_length": med(r["response_length"]["phases"] for r in rounds),
        "row_fill": med(r["row_fill"] for r in rounds),
        "sum_phases_s": med(r["sum_phases_s"] for r in rounds),
        "phase_s": {k: med(r["phases_s"][k] for r in rounds) for k in PHASES},
        "ratios": [r["ratio"] for r in rounds],
        "rounds": rounds,
    }


# ---- command line -------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench.ppo_iteration", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(PRESETS), default="tiny", help="shape preset")
    for name in ("layers", "hidden", "heads", "seq", "vocab"):
        p.add_argument(f"--{name}", type=int, default=None, help="overrides the preset")
    p.add_argument("--stage", choices=sorted(METHODS), default="ppo")
    p.add_argument("--rollout-batch", type=int, default=16, help="prompts per iteration")
    p.add_argument("--samples", type=int, default=1, help="responses per prompt (ppo.n_samples_per_prompt)")
    p.add_argument("--epochs", type=int, default=2, help="ppo.epochs")
    p.add_argument("--iterations", type=int, default=7, help="timed rounds (K)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the measured process")
    p.add_argument("--prep-threads", type=int, default=2, help="torch threads of the preparation runs")
    p.add_argument("--sft-steps", type=int, default=60)
    p.add_argument("--rm-steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--work-dir", type=Path, default=None,
                   help="keep the runs here (reused when their config is unchanged); default: a temp dir")
    p.add_argument("--out", type=Path, default=None, help="also write the full results as JSON here")
    args = p.parse_args(argv)
    for name, value in PRESETS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.iterations < 1 or args.warmup < 0:
        p.error("--iterations must be >= 1 and --warmup >= 0")
    return args


def print_table(summary: dict[str, Any]) -> None:
    print(f"\n| phase (median of {len(summary['ratios'])}) | seconds | share of sum(phases) |")
    print("|---|---|---|")
    for k in PHASES:
        print(f"| {k} | {summary['phase_s'][k]:.3f} | {summary['shares'][k]:.1%} |")
    print(f"| sum(phases) | {summary['sum_phases_s']:.3f} | |")
    print(f"| iteration (train_step) | {summary['iteration_s']:.3f} | |")
    verdict = "met" if summary["ratio"] <= 1.10 else "NOT met"
    print(f"\nratio iteration / sum(phases): median {summary['ratio']:.3f} (CPU time {summary['ratio_cpu']:.3f}); "
          f"goal <= 1.10 {verdict}; per round " + " ".join(f"{r:.3f}" for r in summary["ratios"]))
    print(f"generation share: {summary['generation_share']:.1%} of sum(phases) "
          f"({summary['iteration_own_generation_share']:.1%} by train_step's own timers)")
    print(f"mean response {summary['response_length']:.1f} tokens; prompt + response fill "
          f"{summary['row_fill']:.1%} of model.seq_length rows (rows are padded to the rollout's longest)")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported (trainer.runtime)
    root = args.work_dir.resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="chatforge-ppo-bench-"))
    shape = f"{args.model}-l{args.layers}h{args.hidden}a{args.heads}s{args.seq}v{args.vocab}"
    base = root / shape
    try:
        sft, rm = base / "sft", base / "rm"
        prep = {"sft_s": train_run(sft, sft_overrides(args), args.prep_threads),
                "rm_s": train_run(rm, rm_overrides(args, sft), args.prep_threads)}
        print(f"[bench] prepared: sft {prep['sft_s']:.0f}s, rm {prep['rm_s']:.0f}s", flush=True)
        import psutil

        rss_before = psutil.Process().memory_info().rss
        ctx, stage = build_stage(args, base / args.stage, sft, rm)
        import torch

        params = stage.actor.parameter_count()
        print(f"[bench] torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {ctx.device}; "
              f"stage {args.stage}: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq {args.seq}, "
              f"vocab {stage.tok.vocab_size}, {params / 1e6:.2f}M parameters per model; "
              f"{len(stage.train_ids)} training prompts", flush=True)
        summary = measure(args, stage)
        import resource

        # Peak resident memory of this process after the imports: the models, optimizers,
        # KV cache and activations of the stage (CPU; on a GPU see torch.cuda.max_memory_allocated).
        summary["stage_peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before) / 2**20
        if torch.cuda.is_available():
            summary["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        from trainer import runtime

        runtime.close(ctx)
    finally:
        if args.work_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print_table(summary)
    command = " ".join(["python -m tools.bench.ppo_iteration", *(argv if argv is not None else sys.argv[1:])])
    report = {"bench": "ppo_iteration", "command": command,
              "torch": torch.__version__, "threads": args.threads, "device": str(ctx.device), "parameters": params,
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "preparation_s": prep, **{k: v for k, v in summary.items() if k != "rounds"}}
    print(json.dumps(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**report, "rounds": summary["rounds"]}, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
