"""Hostile strings and secrets through the real command: a run dir named with shell syntax is
used literally (nothing executed), and no secret from the environment reaches the run dir."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

CHATFORGE = Path(sys.executable).parent / "chatforge"
# Each piece would run `touch` if a shell ever saw the value unquoted.
HOSTILE = "a b;touch pwned1;$(touch pwned2)`touch pwned3`'\"\\ &|>x"
SECRETS = {"WANDB_API_KEY": "canarywandbkey0123456789abcdef0123456789ab",
           "HF_TOKEN": "canaryhftoken42", "MY_SERVICE_SECRET": "canaryservicesecret7",
           "AWS_SECRET_ACCESS_KEY": "canaryawssecret9"}


def test_hostile_run_dir_is_literal_and_secrets_stay_out(tmp_path: Path) -> None:
    run = tmp_path / HOSTILE
    quoted = str(run).replace("'", "\\'")  # Hydra's quoted-string escape
    env = {**os.environ, **SECRETS, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([str(CHATFORGE), "logger=wandb", "wandb.mode=offline", "train.steps=2",
                           "train.eval_every=0", "data.embedded.num_docs=200", "ckpt.every=1",
                           f"run.dir='{quoted}'"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [HOSTILE]  # no pwned* anywhere
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert (run / "config.yaml").read_text().count(HOSTILE.split(";")[0]) >= 1
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files) and any(p.name == "rank_0.log" for p in files)
    for path in files:
        data = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in data, f"{name} written into {path}"
    for value in SECRETS.values():
        assert value not in done.stdout + done.stderr
