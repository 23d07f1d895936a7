"""Every kind of bad config the launcher rejects before anything is submitted, each naming its
key; and config values that reach a shell (sbatch/srun) are quoted or refused."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from chatforge_config.trainer import Config
from launcher.cli import preflight
from launcher.devices import Gpu, local_gpus
from launcher.slurm import executor_parameters, sbatch_script
from launcher.validate import find_errors

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
    # the non-finite guard and its fault injection
    (["train.max_bad_steps=0"], "train.max_bad_steps"),
    (["train.fault.nan_grad_step=-1"], "train.fault.nan_grad_step"),
    (["train.fault.nan_grad_steps=0"], "train.fault.nan_grad_steps"),
    (["train.fault.nan_grad_step=3", "train.fault.nan_grad_rank=2", "cluster.procs_per_node=2"],
     "train.fault.nan_grad_rank"),
    # the watchdog and the crash drill
    (["train.hang_timeout=-1"], "train.hang_timeout"),
    (["train.hang_timeout=0.5"], "train.hang_timeout"),
    (["train.hang_timeout=nan"], "train.hang_timeout"),
    (["train.fault.crash=kill"], "train.fault.crash"),
    (["train.fault.crash=raise@0"], "train.fault.crash"),
    (["train.fault.crash=kill@3", "train.fault.crash_rank=2", "cluster.procs_per_node=2"],
     "train.fault.crash_rank"),
    # enumerations
    (["parallel.precision=fp8"], "parallel.precision"),
    (["parallel.recompute=some"], "parallel.recompute"),
    (["parallel.layer_spec=fast"], "parallel.layer_spec"),
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
    (["stage=rm", "rm.score=logprob"], "model.head"),  # the logprob reward keeps the LM head
    (["stage=rm", "rm.score=logprob", "model.head=lm"], "rm.reduce"),  # last: a value-head reduction
    (["stage=rm", "rm.reduce=sum"], "rm.reduce"),
    (["stage=rm", "rm.score=logits"], "rm.score"),
    (["stage=ppo", "ckpt.load={file}", "ppo.reward={file}", "ppo.freeze_actor_steps=-1"], "ppo.freeze_actor_steps"),
    (["stage=grpo", "ckpt.load={file}", "ppo.reward_funcs=[gold]", "ppo.freeze_actor_steps=2"], "ppo.freeze_actor_steps"),
    (["stage=ppo", "ckpt.load={file}", "ppo.reward={file}", "train.steps=3", "ppo.freeze_actor_steps=3"],
     "ppo.freeze_actor_steps"),
    (["stage=rm", "rm.score=logprob", "model.head=lm", "rm.reduce=sum", "rm.beta=0"], "rm.beta"),
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
    # checks of what the run will meet (launcher/validate_run.py, validate_cluster.py): each
    # of these used to pass the launcher and fail on a rank 9-17 s later
    (["tokenizer.vocab_size=10"], "tokenizer.vocab_size"),  # the special and byte pieces
    (["tokenizer.vocab_size=300"], "tokenizer.vocab_size"),  # + 68 characters of the text
    (["tokenizer.character_coverage=0"], "tokenizer.character_coverage"),
    (["run.dir=/proc/chatforge-run"], "run.dir"),  # root may "access" it, mkdir fails
    (["run.dir=''"], "run.dir"),  # would have run in the current directory
    (["stage=sft", "data=chatml", "data.path={file}"], "data.path"),  # not JSON at line 1
    (["stage=sft", "data=chatml", "data.path={half}"], "data.path"),  # line 2 has no messages
    (["stage=dpo", "data=preference", "data.path={half}"], "data.path"),  # chat, not pairs
    (["data=text", "data.path={binary}"], "data.path"),  # not UTF-8
    # keys driven past their edges (negative, zero, too large, NaN/inf, inconsistent):
    # each failed on a rank with a library's assertion or traceback, hung, or trained on
    # NaN (the full drive: docs/launcher.md)
    (["optim.lr=1e-5"], "optim.min_lr"),  # megatron's scheduler asserts min_lr <= lr
    (["optim.lr=nan"], "optim.lr"),
    (["optim.beta2=1.0"], "optim.beta2"),
    (["optim.eps=0"], "optim.eps"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay"),
    (["optim.clip_grad=-1"], "optim.clip_grad"),
    (["optim.decay_steps=-1"], "optim.decay_steps"),
    (["model.hidden_dropout=1.5"], "model.hidden_dropout"),  # torch's Dropout raises
    (["model.attention_dropout=-0.1"], "model.attention_dropout"),
    (["model.init_std=-1"], "model.init_std"),
    (["model.layernorm_epsilon=0"], "model.layernorm_epsilon"),
    (["model.rotary_base=0", "model.position_embedding=rope"], "model.rotary_base"),
    (["model.num_layers=1000000000000"], "model"),  # more memory than this machine has
    (["train.eval_every=-1"], "train.eval_every"),
    (["train.eval_batches=-1"], "train.eval_batches"),
    (["train.log_every=-1"], "train.log_every"),
    (["train.exit_interval=-1"], "train.exit_interval"),
    (["train.max_minutes=nan"], "train.max_minutes"),
    (["data.eval_fraction=1.0"], "data.eval_fraction"),
    (["data.embedded.num_docs=0"], "data.embedded.num_docs"),
    (["stage=sft", "data.embedded.num_chats=0"], "data.embedded.num_chats"),
    (["data.embedded.families=nosuch"], "data.embedded.families"),
    (["tokenizer.max_sentences=-1"], "tokenizer.max_sentences"),
    (["best_of_n.num_prompts=-1"], "best_of_n.num_prompts"),
    (["rm.margin=inf"], "rm.margin"),
    (["dpo.beta=inf"], "dpo.beta"),
    (["ppo.kl_coef=inf"], "ppo.kl_coef"),
    (["sampling.temperature=inf"], "sampling.temperature"),
    (["stage=best_of_n", "ckpt.load={file}", "best_of_n.reward={file}", "sampling.max_new_tokens=128"],
     "sampling.max_new_tokens"),  # no room for the prompt in model.seq_length=128
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
    ([*SLURM, "cluster.mem_gb=nan"], "cluster.mem_gb"),
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
    files = _input_files(tmp_path)
    for name, path in files.items():
        overrides = [o.replace(f"{{{name}}}", str(path)) for o in overrides]
    if not any(o.startswith("run.dir=") for o in overrides):
        overrides.append(f"run.dir={tmp_path / 'run'}")
    points, errors = preflight(overrides, multirun=False)
    assert errors, f"{overrides} was accepted"
    assert any(line.startswith(f"{key}=") for line in errors), errors
    # Nothing created (no run dir, no probe left behind), nothing submitted.
    assert sorted(tmp_path.iterdir()) == sorted(files.values())


def _input_files(where: Path) -> dict[str, Path]:
    """The files the table's {placeholders} name: a one-line non-JSON file, a chatML file
    whose second record is not chat, a binary file."""
    files = {"file": where / "file", "half": where / "half.jsonl", "binary": where / "binary"}
    files["file"].write_text("x")
    files["half"].write_text('{"messages": [{"role": "user", "content": "hi"}, '
                             '{"role": "assistant", "content": "hello"}]}\n{"text": "plain"}\n')
    files["binary"].write_bytes(bytes([0x7f, 0x45, 0x4c, 0x46, 0xff, 0xfe, 0x00, 0x01]))
    return files


def test_the_first_offending_line_of_a_data_file_is_named(tmp_path: Path) -> None:
    files = _input_files(tmp_path)
    _, errors = preflight(["stage=sft", "data=chatml", f"data.path={files['half']}",
                           f"run.dir={tmp_path / 'run'}"], multirun=False)
    assert errors == [f"data.path={files['half']}: {files['half']}:2: not chatml data: missing key "
                      f"'messages' (keys: ['text'])"]
    _, errors = preflight(["data=text", f"data.path={files['binary']}", f"run.dir={tmp_path / 'run'}"], False)
    assert errors == [f"data.path={files['binary']}: {files['binary']}:1: not UTF-8 text (byte 4: b'\\xff')"]


@pytest.mark.parametrize("gpus, overrides, error", [
    ((), ["parallel.precision=bf16"], "parallel.precision=bf16: cluster=local runs the ranks on this "
                                      "machine, which has no GPU"),
    ((Gpu("Tesla V100-SXM2-16GB", 7.0),), ["parallel.precision=bf16"],
     "parallel.precision=bf16: this machine's Tesla V100-SXM2-16GB (compute capability 7.0) has no native bf16"),
    ((Gpu("NVIDIA H100 80GB HBM3", 9.0),), ["parallel.precision=bf16"], None),
    ((Gpu("NVIDIA H100 80GB HBM3", 9.0),), ["cluster.procs_per_node=2"],
     "cluster.procs_per_node=2: this machine has 1 GPU(s) (NVIDIA H100 80GB HBM3) and each rank needs its own"),
    ((), ["cluster=slurm", "cluster.gpus_per_node=8", "cluster.procs_per_node=8", "parallel.precision=bf16",
          "train.global_batch=16", *SHARED], None),  # SLURM ranks run elsewhere: this machine's devices do not matter
], ids=["cpu", "v100", "h100", "one-gpu-two-ranks", "slurm"])
def test_precision_and_ranks_fit_this_machine_for_local_runs(
        gpus: tuple[Gpu, ...], overrides: list[str], error: str | None, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("launcher.validate_run._gpus_here", lambda: gpus)
    _, errors = preflight([*overrides, f"run.dir={tmp_path / 'run'}"], multirun=False)
    errors = [e for e in errors if "sbatch is not on PATH" not in e]
    if error is None:
        assert errors == []
    else:
        assert len(errors) == 1 and errors[0].startswith(error), errors
        assert "compute capability >= 8.0" in errors[0] or "procs_per_node" in error
    # `chatforge plan` may describe a run for another machine: no device check.
    assert [e for e in preflight([*overrides, f"run.dir={tmp_path / 'run'}"], False, device=False)[1]
            if "sbatch" not in e] == []


def test_gpus_are_found_without_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nvidia-smi in a subprocess (a stand-in here), filtered by CUDA_VISIBLE_DEVICES as CUDA does."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA A100-SXM4-80GB, 8.0'\necho 'Tesla T4, 7.5'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    a100, t4 = Gpu("NVIDIA A100-SXM4-80GB", 8.0), Gpu("Tesla T4", 7.5)
    assert local_gpus({}) == [a100, t4]
    assert local_gpus({"CUDA_VISIBLE_DEVICES": "1"}) == [t4]
    assert local_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert local_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert local_gpus({"CUDA_VISIBLE_DEVICES": "0,7,1"}) == [a100]  # CUDA stops at an invalid one


def test_warnings_for_legal_but_surely_unintended_settings(tmp_path: Path) -> None:
    run = tmp_path / "run"
    points, errors = preflight(["optim.warmup_steps=1000", "train.steps=10", "ckpt.every=50",
                                f"run.dir={run}"], multirun=False)
    assert errors == []
    assert points[0].warnings == [
        "optim.warmup_steps=1000: longer than the run (train.steps=10); the learning rate never "
        "reaches optim.lr (the schedule caps warmup at 9 steps)",
        "ckpt.every=50: longer than the run (train.steps=10); only the final checkpoint is written"]
    assert preflight([f"run.dir={run}"], False)[0][0].warnings == []  # the defaults are quiet
    # A new sweep in an old sweep's run.dir: each point would continue the old point's run.
    (run / "1").mkdir(parents=True)
    (run / "1" / "config.yaml").write_text("optim:\n  lr: 0.001\ntrain:\n  steps: 5\n")
    points, errors = preflight(["optim.lr=1e-4,3e-4", f"run.dir={run}"], multirun=True)
    assert errors == [] and points[0].warnings == []
    assert points[1].warnings == [
        f"run.dir={run / '1'}: already holds a run with other settings (optim.lr: 0.001 there, 0.0003 "
        "here); this run continues from its checkpoints: use a new run.dir for a new run"]


def test_the_cli_prints_warnings_and_refuses_fast(tmp_path: Path) -> None:
    chatforge = Path(sys.executable).parent / "chatforge"
    done = subprocess.run([str(chatforge), "plan", "optim.warmup_steps=1000", "train.steps=10",
                           f"run.dir={tmp_path / 'run'}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "chatforge: warning: optim.warmup_steps=1000: longer than the run" in done.stderr
    done = subprocess.run([str(chatforge), "tokenizer.vocab_size=10", f"run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("chatforge: error: tokenizer.vocab_size=10: too small")
    assert not (tmp_path / "run").exists()


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


def sbatch_argument(raw: str) -> str:
    """One #SBATCH argument read the way sbatch reads it (_get_argument in Slurm's
    src/sbatch/opt.c), which is not a POSIX shell: a backslash escapes the next character
    even inside quotes, quotes group, an unquoted # starts a comment."""
    out, quote, escaped = [], "", False
    for char in raw:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
            continue
        elif quote:
            if char == quote:
                quote = ""
                continue
        elif char in "'\"":
            quote = char
            continue
        elif char == "#" or char.isspace():
            break
        out.append(char)
    return "".join(out)


def sbatch_values(script: str) -> dict[str, str]:
    """#SBATCH --key=value lines, each value as sbatch reads it."""
    values = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, raw = line[len("#SBATCH --"):].partition("=")
            values[key] = sbatch_argument(raw)
    return values


# What sbatch's parser keeps intact (the launcher refuses a backslash in these keys).
SBATCH_HOSTILE = HOSTILE.replace("\\", "")


def test_hostile_strings_reach_sbatch_and_srun_quoted(tmp_path: Path) -> None:
    run_dir = tmp_path / f"run {SBATCH_HOSTILE}"
    cfg = slurm_cfg(**{"run.dir": str(run_dir), "cluster.partition": SBATCH_HOSTILE,
                       "cluster.account": SBATCH_HOSTILE, "cluster.job_name": SBATCH_HOSTILE,
                       "cluster.sbatch_extra": {"comment": SBATCH_HOSTILE},
                       "cluster.srun_extra": [f"--comment={HOSTILE}"],
                       "cluster.container_image": HOSTILE, "cluster.node_local_prefixes": []})
    assert [e for e in find_errors(cfg) if "sbatch is not on PATH" not in str(e)] == []
    script = sbatch_script(cfg)
    values = sbatch_values(script)
    for key in ("partition", "account", "job-name", "comment"):
        assert values[key] == SBATCH_HOSTILE, key
    assert values["output"].startswith(str(run_dir))
    srun_line = next(line for line in script.splitlines() if line.startswith("srun "))
    args = shlex.split(srun_line)
    assert f"--comment={HOSTILE}" in args and f"--container-image={HOSTILE}" in args
    assert args[-1] == str(run_dir / "logs" / "slurm")  # the submitit folder, one argument


def test_backslashes_on_sbatch_lines_are_refused() -> None:
    """sbatch would drop them (its parser is not a shell): the job would see another value."""
    for key in ("cluster.partition", "cluster.account", "cluster.job_name", "run.dir"):
        errors = find_errors(slurm_cfg(**{key: "a\\b", "cluster.node_local_prefixes": []}))
        assert any(e.key == key and "backslash" in e.message for e in errors), (key, [str(e) for e in errors])
    errors = find_errors(slurm_cfg(**{"cluster.sbatch_extra": {"comment": "a\\b"}}))
    assert any(e.key == "cluster.sbatch_extra.comment" for e in errors)
    # srun's line is read by bash: a backslash is quoted there like anything else.
    errors = find_errors(slurm_cfg(**{"cluster.srun_extra": ["--comment=a\\b"], "cluster.container_image": "a\\b"}))
    assert not [e for e in errors if "backslash" in e.message]


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


def test_the_embedded_text_is_printable_ascii() -> None:
    """What lets the tokenizer check skip generating the embedded corpus for a vocabulary
    with room for every printable ASCII character."""
    from launcher.validate_run import EMBEDDED_ALPHABET
    from trainer.data.corpus import generate_corpus

    for seed in (0, 7):
        assert set("".join(generate_corpus(2000, seed))) - {"\n"} <= EMBEDDED_ALPHABET
