"""Hostile strings and secrets through the real cluster: a job name, an sbatch option and an
srun option full of shell syntax reach Slurm literally (nothing runs), and no secret from the
submitting environment is written into the run dir."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.slurm.conftest import chatforge

# Each piece would run `touch` if a shell saw the value unquoted. No backslash: sbatch's
# #SBATCH parser drops it, so the launcher refuses it in these keys (tests/unit/test_bad_configs.py).
HOSTILE = "a b;touch pwned1;$(touch pwned2)`touch pwned3`'\" &>x|y"
SECRETS = {"WANDB_API_KEY": "canarywandbkey0123456789abcdef0123456789ab",
           "HF_TOKEN": "canaryhftoken42", "MY_SERVICE_SECRET": "canaryservicesecret7"}


def test_hostile_cluster_strings_are_literal_and_secrets_stay_out(
        tmp_path: Path, slurm_env: dict[str, str]) -> None:
    quoted = HOSTILE.replace("'", "\\'")  # Hydra's quoted-string escape
    run = tmp_path / "run"
    done = chatforge(["model=tiny", "logger=wandb", "wandb.mode=offline", "train.steps=2",
                      "train.eval_every=0", "data.embedded.num_docs=200", "cluster=slurm",
                      "cluster.node_local_prefixes=[]", f"cluster.job_name='{quoted}'",
                      f"+cluster.sbatch_extra.comment='{quoted}'",
                      f"cluster.srun_extra=['--comment={quoted}']", f"run.dir={run}"],
                     {**slurm_env, **SECRETS}, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job = json.loads((run / "logs" / "slurm" / "job.json").read_text())["job_id"]
    # squeue (finished jobs stay listed, MinJobAge): sacct's database turns " into `.
    for field in ("%j", "%k"):  # the job's name, its comment
        seen = subprocess.run(["squeue", "-h", "-j", job, "-t", "all", "-o", field], env=slurm_env,
                              capture_output=True, text=True).stdout.rstrip("\n")
        assert seen == HOSTILE, (field, seen)
    assert not [p for p in tmp_path.rglob("pwned*")] and not list(Path.cwd().glob("pwned*"))
    for path in (p for p in run.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in data, f"{name} written into {path}"
