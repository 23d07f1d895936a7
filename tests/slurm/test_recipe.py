"""A reduced recipe on the real cluster: its steps are jobs chained by afterok dependencies;
one is killed mid-run (scancel), the next steps are cancelled with it, and rerunning the
recipe skips the finished steps and resumes the killed one from its checkpoint."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from launcher.jobs import FINAL, states
from launcher.failures import failure_text
from tests.slurm.conftest import chatforge, losses, wait_until

RECIPE = ["recipe=smoke", "recipe.only=[tokenizer,pretrain,sft,dpo]", "cluster=slurm", "cluster.wait=false",
          "cluster.node_local_prefixes=[]",
          'recipe.steps.sft.extra=["train.steps=150","ckpt.every=5","train.eval_every=0"]']


def _job(run_dir: Path) -> dict:
    return json.loads((run_dir / "logs" / "slurm" / "job.json").read_text())


def _state(job: str) -> str:
    return states([job]).get(job, ("UNKNOWN",))[0]


def test_recipe_runs_as_dependent_jobs_and_a_killed_step_resumes(tmp_path: Path,
                                                                  slurm_env: dict[str, str]) -> None:
    run = tmp_path / "recipe"
    first = chatforge([*RECIPE, f"run.dir={run}"], slurm_env, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = {name: _job(run / name) for name in ("tokenizer", "pretrain", "sft", "dpo")}
    ids = {name: str(info["job_id"]) for name, info in jobs.items()}
    assert jobs["tokenizer"]["after"] == [] and jobs["pretrain"]["after"] == [ids["tokenizer"]]
    assert jobs["sft"]["after"] == [ids["pretrain"]] and jobs["dpo"]["after"] == [ids["sft"]]
    script = (run / "sft" / "logs" / "slurm" / f"{ids['sft']}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{ids['pretrain']}" in script
    assert "#SBATCH --kill-on-invalid-dep=yes" in script
    listing = chatforge(["jobs"], slurm_env, tmp_path).stdout
    row = next(line for line in listing.splitlines() if line.startswith(ids["dpo"] + " "))
    assert row.split()[2] == ids["sft"], listing  # the AFTER column shows the chain

    sft = run / "sft"
    wait_until(lambda: (sft / "metrics.jsonl").exists() and max(losses(sft), default=0) >= 12, 300,
               "SFT past its checkpoint at step 10")
    subprocess.run(["scancel", ids["sft"]], env=slurm_env, check=True)
    wait_until(lambda: _state(ids["sft"]) in FINAL and _state(ids["dpo"]) in FINAL, 120, "the chain to end")
    assert _state(ids["sft"]) == "CANCELLED"
    assert _state(ids["dpo"]) != "COMPLETED" and not (run / "dpo" / "done.json").exists()
    killed_at = max(losses(sft))

    second = chatforge([*RECIPE, f"run.dir={run}"], slurm_env, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "recipe step tokenizer: done, skipped" in second.stdout
    assert "recipe step pretrain: done, skipped" in second.stdout
    new_sft, new_dpo = str(_job(sft)["job_id"]), str(_job(run / "dpo")["job_id"])
    assert new_sft != ids["sft"] and _job(run / "dpo")["after"] == [new_sft]
    wait_until(lambda: _state(new_dpo) in FINAL, 600, "the resubmitted chain")
    assert _state(new_sft) == "COMPLETED", failure_text(sft)
    assert _state(new_dpo) == "COMPLETED", failure_text(run / "dpo")
    log = (sft / "logs" / "rank_0.log").read_text()
    resumed = [int(m) for m in re.findall(r"continuing at step (\d+)", log)]
    assert resumed and 10 <= resumed[-1] <= killed_at, (resumed, killed_at)  # resumed, not restarted
    assert json.loads((sft / "done.json").read_text())["steps"] == 150
    assert sorted(losses(sft)) == list(range(1, 151))
