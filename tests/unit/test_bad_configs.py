"""Every kind of bad config the launcher rejects before anything is submitted, each naming its
key; and config values that reach a shell (sbatch/srun) are quoted or refused."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from launcher.cli import preflight
from launcher.slurm import executor_parameters, sbatch_script
from launcher.validate import find_errors
from trainer.config import Config

SHARED = ["cluster.node_local_prefixes=[]"]  # tmp_path is under /tmp
SLURM = ["cluster=slurm", *SHARED]

# (overrides, the key the error must name). Each line is a different kind of mistake.
BAD: list[tuple[list[str], str]] = [
    # Hydra composition
    (["model=nosuch"], "model"),
    (["cluster=nosuch"], "cluster"),
    (["train.stepz=5"], "train.stepz"),
    (["train.steps=abc"], "train.steps"),
    # sizes
    (["train.steps=0"], "train.steps"),
    (["train.micro_batch=0"], "train.micro_batch"),
    (["model.seq_length=0"], "model.seq_length"),
    (["cluster.threads_per_proc=0"], "cluster.threads_per_proc"),
    (["optim.lr=0"], "optim.lr"),
    (["ckpt.every=-1"], "ckpt.every"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps"),
    # enumerations
    (["parallel.precision=fp8"], "parallel.precision"),
    (["parallel.recompute=some"], "parallel.recompute"),
    (["optim.decay=step"], "optim.decay"),
    (["optim.name=sgd"], "optim.name"),
    (["logger=tensorboard"], "logger"),
    (["model.activation=relu"], "model.activation"),
    (["model.normalization=batchnorm"], "model.normalization"),
    (["model.position_embedding=alibi"], "model.position_embedding"),
    (["tokenizer.model_type=char"], "tokenizer.model_type"),
    (["cluster.name=pbs"], "cluster.name"),
    # layout: parallel sizes vs world, model split, batch arithmetic, vocab padding
    (["parallel.tp=2"], "parallel.tp"),
    (["parallel.tp=2", "parallel.pp=2", "cluster.procs_per_node=2"], "parallel.pp"),
    (["parallel.tp=8", "cluster.procs_per_node=8"], "parallel.tp"),
    (["model.hidden_size=66"], "model.hidden_size"),
    (["model.num_query_groups=3"], "model.num_query_groups"),
    (["model.num_query_groups=1", "parallel.tp=2", "cluster.procs_per_node=2"],
     "model.num_query_groups"),
    (["model.ffn_hidden_size=255", "parallel.tp=2", "cluster.procs_per_node=2"],
     "model.ffn_hidden_size"),
    (["model.make_vocab_size_divisible_by=3", "parallel.tp=2", "cluster.procs_per_node=2"],
     "model.make_vocab_size_divisible_by"),
    (["parallel.pp=3", "cluster.procs_per_node=3"], "model.num_layers"),
    (["train.global_batch=6", "cluster.procs_per_node=2"], "train.global_batch"),
    (["cluster.nodes=2"], "cluster.nodes"),
    # paths
    (["data=text"], "data.path"),
    (["data=text", "data.path=/nonexistent/corpus.txt"], "data.path"),
    (["tokenizer.path=/nonexistent/spm.model"], "tokenizer.path"),
    (["ckpt.load=/nonexistent/checkpoints"], "ckpt.load"),
    # post-training stages: data each stage reads, head, inputs, hyperparameter ranges
    (["stage=rm", "data=chatml", "data.path={file}"], "data.format"),
    (["stage=pretrain", "data=hh_rlhf", "data.path={file}"], "data.format"),
    (["stage=sft", "data=chatml"], "data.path"),
    (["stage=dpo", "data=preference", "data.path=/nonexistent/pairs.jsonl"], "data.path"),
    (["stage=sft", "model.head=scalar"], "model.head"),
    (["stage=best_of_n", "best_of_n.reward={file}"], "ckpt.load"),
    (["stage=rejection_sampling", "ckpt.load={file}"], "best_of_n.reward"),
    (["stage=best_of_n", "ckpt.load={file}", "best_of_n.reward=/nonexistent/rm"], "best_of_n.reward"),
    (["stage=dpo", "dpo.beta=0"], "dpo.beta"),
    (["stage=dpo", "dpo.loss=kto"], "dpo.loss"),
    (["stage=rm", "rm.reduce=max"], "rm.reduce"),
    (["data.overlong=wrap"], "data.overlong"),
    (["data.embedded.flip=1.5"], "data.embedded.flip"),
    (["data.embedded.same_style=-0.5"], "data.embedded.same_style"),
    (["sampling.top_p=0"], "sampling.top_p"),
    (["sampling.temperature=-1"], "sampling.temperature"),
    (["best_of_n.n=0"], "best_of_n.n"),
    (["eval.pass_k=0"], "eval.pass_k"),
    (["eval.bootstrap=0"], "eval.bootstrap"),
    (["eval.rm_pairs=-1"], "eval.rm_pairs"),
    (["run.dir={file}"], "run.dir"),
    # RLHF (ppo, a2c): inputs, enumerations, ranges, rollout arithmetic
    (["stage=ppo", "ppo.reward={file}"], "ckpt.load"),
    (["stage=a2c", "ckpt.load={file}"], "ppo.reward"),
    (["stage=ppo", "ckpt.load={file}", "ppo.reward=/nonexistent/rm"], "ppo.reward"),
    (["ppo.critic_init=random"], "ppo.critic_init"),
    (["data.embedded.prefer=short"], "data.embedded.prefer"),
    (["ppo.rollout_batch=0"], "ppo.rollout_batch"),
    (["ppo.epochs=0"], "ppo.epochs"),
    (["ppo.kl_horizon=0"], "ppo.kl_horizon"),
    (["ppo.clip=0"], "ppo.clip"),
    (["ppo.value_clip=-0.1"], "ppo.value_clip"),
    (["ppo.kl_coef=-0.05"], "ppo.kl_coef"),
    (["ppo.kl_target=-1"], "ppo.kl_target"),
    (["ppo.gamma=1.5"], "ppo.gamma"),
    (["ppo.lam=-0.1"], "ppo.lam"),
    (["ppo.entropy_coef=-0.01"], "ppo.entropy_coef"),
    (["ppo.ptx_coef=-1"], "ppo.ptx_coef"),
    (["ppo.critic_lr=-1e-5"], "ppo.critic_lr"),
    (["ppo.missing_eos_penalty=-1"], "ppo.missing_eos_penalty"),
    (["stage=a2c", "ckpt.load={file}", "ppo.reward={file}", "cluster.procs_per_node=2",
      "ppo.rollout_batch=6"], "ppo.rollout_batch"),  # not a multiple of micro_batch 2 x DP 2
    (["stage=ppo", "ckpt.load={file}", "ppo.reward={file}", "ppo.rollout_batch=12"],
     "ppo.rollout_batch"),  # not a multiple of train.global_batch=8
    (["stage=ppo", "ckpt.load={file}", "ppo.reward={file}", "sampling.max_new_tokens=128"],
     "sampling.max_new_tokens"),  # no room left for the prompt in model.seq_length=128
    # SLURM resources and options
    (["cluster=slurm", "run.dir=/tmp/chatforge-node-local"], "run.dir"),
    ([*SLURM, "cluster.gpus_per_node=8", "cluster.procs_per_node=4"], "cluster.procs_per_node"),
    ([*SLURM, "parallel.precision=bf16"], "parallel.precision"),
    ([*SLURM, "cluster.gpus_per_node=-1"], "cluster.gpus_per_node"),
    ([*SLURM, "cluster.time_min=0"], "cluster.time_min"),
    ([*SLURM, "cluster.signal_seconds=3600", "cluster.time_min=60"], "cluster.signal_seconds"),
    ([*SLURM, "cluster.max_requeues=-1"], "cluster.max_requeues"),
    ([*SLURM, "cluster.cpus_per_task=0"], "cluster.cpus_per_task"),
    ([*SLURM, "cluster.threads_per_proc=4", "cluster.cpus_per_task=2"], "cluster.threads_per_proc"),
    ([*SLURM, "cluster.mem_gb=-1"], "cluster.mem_gb"),
    ([*SLURM, "cluster.partition=''"], "cluster.partition"),
    ([*SLURM, "+cluster.sbatch_extra.nodes=3"], "cluster.sbatch_extra.nodes"),
    ([*SLURM, "+cluster.sbatch_extra.Mail_Type=END"], "cluster.sbatch_extra.Mail_Type"),
    ([*SLURM, "cluster.srun_extra=[cpu-bind]"], "cluster.srun_extra[0]"),
    ([*SLURM, "cluster.mfu=1.5"], "cluster.mfu"),
    ([*SLURM, "cluster.peak_tflops=0"], "cluster.peak_tflops"),
    # memory per device: llama2_7b on one 80 GB GPU without sharding
    ([*SLURM, "model=llama2_7b", "tokenizer.vocab_size=32000", "cluster.gpus_per_node=1",
      "parallel.precision=bf16", "train.micro_batch=1", "train.global_batch=8"],
     "cluster.gpu_memory_gb"),
    # memory per node on CPU: gpt_1p3b in 1 GB
    ([*SLURM, "model=gpt_1p3b", "cluster.mem_gb=1"], "cluster.mem_gb"),
]


def test_at_least_thirty_kinds() -> None:
    assert len(BAD) >= 30
    assert len({tuple(o) for o, _ in BAD}) == len(BAD)


@pytest.mark.parametrize("overrides,key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_is_rejected_naming_its_key(overrides: list[str], key: str,
                                               tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    overrides = [o.replace("{file}", str(tmp_path / "file")) for o in overrides]
    if not any(o.startswith("run.dir=") for o in overrides):
        overrides.append(f"run.dir={tmp_path / 'run'}")
    points, errors = preflight(overrides, multirun=False)
    assert errors, f"{overrides} was accepted"
    assert any(line.startswith(f"{key}=") for line in errors), errors
    assert not (tmp_path / "run").exists()  # nothing created, nothing submitted


def test_a_good_slurm_config_passes(tmp_path: Path) -> None:
    points, errors = preflight([*SLURM, "cluster.nodes=2", f"run.dir={tmp_path}"], False)
    errors = [e for e in errors if "sbatch is not on PATH" not in e]  # CI may lack a cluster
    assert errors == []


@pytest.mark.parametrize("stage", ["ppo", "a2c"])
def test_a_good_rl_config_passes(stage: str, tmp_path: Path) -> None:
    (tmp_path / "sft").mkdir()
    (tmp_path / "rm").mkdir()
    points, errors = preflight([f"stage={stage}", f"ckpt.load={tmp_path / 'sft'}",
                                f"ppo.reward={tmp_path / 'rm'}", "cluster.procs_per_node=2",
                                "ppo.rollout_batch=16", "data.embedded.prefer=brief",
                                "ppo.critic_init=policy", f"run.dir={tmp_path / 'run'}"], False)
    assert errors == []


def test_a_reward_model_that_cannot_split_over_this_layout_is_refused(tmp_path: Path) -> None:
    """The reward model keeps its own model config but runs at the run's TP: 4 heads do not
    split over 8 ranks, even though the policy's 8 heads do."""
    (tmp_path / "sft").mkdir()
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.yaml").write_text("model:\n  num_attention_heads: 4\n  head: scalar\n")
    common = [f"ckpt.load={tmp_path / 'sft'}", f"ppo.reward={tmp_path / 'rm'}", "stage=ppo",
              "model.num_attention_heads=8", "ppo.rollout_batch=16", "train.micro_batch=2",
              f"run.dir={tmp_path / 'run'}"]
    _, errors = preflight([*common, "parallel.tp=8", "cluster.procs_per_node=8"], False)
    assert any(e.startswith("ppo.reward=") and "num_attention_heads=4" in e for e in errors), errors
    _, errors = preflight([*common, "parallel.tp=2", "cluster.procs_per_node=2"], False)
    assert errors == []


# ---- hostile strings ------------------------------------------------------------------------

HOSTILE = "a b;$(touch /tmp/pwned)`id`'\"\\ &|>"


def slurm_cfg(**values: object) -> DictConfig:
    cfg = OmegaConf.structured(Config)
    OmegaConf.update(cfg, "cluster.name", "slurm")
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def sbatch_values(script: str) -> dict[str, str]:
    """#SBATCH --key=value lines, the value read the way a POSIX shell would read it."""
    values = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, raw = line[len("#SBATCH --"):].partition("=")
            values[key] = shlex.split(raw)[0] if raw else ""
    return values


def test_hostile_strings_reach_sbatch_and_srun_quoted(tmp_path: Path) -> None:
    run_dir = tmp_path / f"run {HOSTILE}"
    cfg = slurm_cfg(**{"run.dir": str(run_dir), "cluster.partition": HOSTILE,
                       "cluster.account": HOSTILE, "cluster.job_name": HOSTILE,
                       "cluster.sbatch_extra": {"comment": HOSTILE},
                       "cluster.srun_extra": [f"--comment={HOSTILE}"],
                       "cluster.container_image": HOSTILE})
    script = sbatch_script(cfg)
    values = sbatch_values(script)
    for key in ("partition", "account", "job-name", "comment"):
        assert values[key] == HOSTILE, key
    assert values["output"].startswith(str(run_dir))
    srun_line = next(line for line in script.splitlines() if line.startswith("srun "))
    args = shlex.split(srun_line)
    assert f"--comment={HOSTILE}" in args and f"--container-image={HOSTILE}" in args
    assert args[-1] == str(run_dir / "logs" / "slurm")  # the submitit folder, one argument


def test_control_characters_are_refused() -> None:
    for key in ("cluster.partition", "cluster.account", "cluster.qos", "cluster.constraint",
                "cluster.job_name", "cluster.container_image"):
        errors = find_errors(slurm_cfg(**{key: "gpu\n#SBATCH --nodes=99", "run.dir": "runs/x"}))
        assert any(e.key == key for e in errors), (key, [str(e) for e in errors])
    errors = find_errors(slurm_cfg(**{"cluster.sbatch_extra": {"comment": "x\ny"}}))
    assert any(e.key == "cluster.sbatch_extra.comment" for e in errors)
    errors = find_errors(slurm_cfg(**{"run.dir": "runs/a\nb"}))
    assert any(e.key == "run.dir" for e in errors)


def test_executor_parameters_map_every_cluster_key() -> None:
    cfg = slurm_cfg(**{"cluster.nodes": 2, "cluster.procs_per_node": 8,
                       "cluster.gpus_per_node": 8, "cluster.cpus_per_task": 10,
                       "cluster.mem_gb": 500, "cluster.time_min": 240,
                       "cluster.partition": "gpu", "cluster.account": "proj",
                       "cluster.qos": "high", "cluster.constraint": "h100",
                       "cluster.exclusive": True, "cluster.setup": ["module load cuda"],
                       "cluster.signal_seconds": 300, "cluster.container_image": "img.sqsh",
                       "cluster.container_mounts": "/data:/data", "run.dir": "runs/big"})
    p = executor_parameters(cfg)
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"], p["cpus_per_task"]) == (2, 8, 8, 10)
    assert (p["mem"], p["time"], p["partition"], p["account"]) == ("512000M", 240, "gpu", "proj")
    assert (p["qos"], p["constraint"], p["exclusive"]) == ("high", "h100", True)
    assert p["setup"] == ["module load cuda"] and p["job_name"] == "chatforge-big"
    assert p["additional_parameters"]["signal"] == "USR1@300"
    assert "--container-image=img.sqsh" in p["srun_args"]
    assert "--container-mounts=/data:/data" in p["srun_args"]
    script = sbatch_script(cfg)
    assert "#SBATCH --signal=USR1@300" in script and "module load cuda" in script
