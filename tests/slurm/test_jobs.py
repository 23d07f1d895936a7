"""Jobs through the real cluster: sbatch + srun via submitit, two nodes in two network
namespaces, against the same job run as local processes."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.slurm.conftest import chatforge, losses

TINY = ["model=tiny", "logger=none", "train.steps=10", "train.eval_every=5",
        "data.embedded.num_docs=300", "cluster.node_local_prefixes=[]"]
# A run dir a shell would mangle: it reaches #SBATCH lines, srun and the submitit command.
HOSTILE_NAME = "tp2 $(touch pwned) `id` 'q' \"dq\""


def test_two_node_tp2_job_matches_local(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    local_dir, slurm_dir = tmp_path / "local", tmp_path / HOSTILE_NAME
    local = chatforge([*TINY, "parallel.tp=2", "cluster.procs_per_node=2",
                       f"run.dir={local_dir}"], slurm_env, tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    slurm = chatforge([*TINY, "parallel.tp=2", "cluster=slurm", "cluster.nodes=2",
                       "cluster.procs_per_node=1", f"run.dir={json.dumps(str(slurm_dir))}"],
                      slurm_env, tmp_path)
    assert slurm.returncode == 0, slurm.stdout[-3000:] + slurm.stderr[-3000:]
    assert "submitted job" in slurm.stdout and "step 10/10" in slurm.stdout
    job = json.loads((slurm_dir / "logs" / "slurm" / "job.json").read_text())
    # The two ranks ran on the two nodes (each in its own network namespace).
    hosts = [(slurm_dir / "logs" / f"rank_{r}.log").read_text().splitlines()[0] for r in (0, 1)]
    assert " on n1 " in hosts[0] and " on n2 " in hosts[1], hosts
    state = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State,NodeList", "-j",
                            job["job_id"]], env=slurm_env, capture_output=True, text=True)
    assert state.stdout.strip() == "COMPLETED|n[1-2]", state.stdout
    expected, got = losses(local_dir), losses(slurm_dir)
    assert sorted(got) == list(range(1, 11))
    for step, loss in expected.items():
        assert abs(got[step] - loss) < 1e-6, (step, got[step], loss)
    assert not list(tmp_path.rglob("pwned")) and not (Path.cwd() / "pwned").exists()
