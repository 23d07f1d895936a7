"""Recipes without running anything: composition of every step, inputs, overrides, subsets,
errors before anything starts, the done rule, and the SLURM chain's dependencies."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from launcher.cli import _parse, _recipe_steps, main
from launcher.recipe import Step, is_done, submit_steps
from trainer.exitcodes import DONE_FILE

SMOKE = ["tokenizer", "pretrain", "sft", "rm", "ppo", "a2c", "grpo", "grpo_rm", "dpo", "best_of_n",
         "rejection_sampling", "eval"]


def _steps(tmp_path: Path, *overrides: str) -> tuple[Any, list[Step], list[str]]:
    return _recipe_steps(_parse(["recipe=smoke", f"run.dir={tmp_path}", *overrides]))


def test_every_step_is_composed_with_its_inputs_and_the_command_line(tmp_path: Path) -> None:
    root, steps, errors = _steps(tmp_path, "seed=7", "train.steps=9",
                                 'recipe.steps.dpo.extra=["train.steps=2","dpo.beta=0.3"]')
    assert errors == []
    assert [s.name for s in steps] == SMOKE
    by = {s.name: s.cfg for s in steps}
    assert by["pretrain"].tokenizer.path == str(tmp_path / "tokenizer" / "tokenizer" / "tokenizer.model")
    assert by["sft"].ckpt.load == str(tmp_path / "pretrain")
    assert (by["ppo"].ckpt.load, by["ppo"].ppo.reward) == (str(tmp_path / "sft"), str(tmp_path / "rm"))
    assert by["rm"].model.head == "scalar" and by["sft"].model.head == "lm"  # stage=rm's own YAML
    assert by["eval"].eval.models.split(",") == [str(tmp_path / n) for n in
                                                 ("pretrain", "sft", "ppo", "a2c", "grpo", "grpo_rm", "dpo",
                                                  "best_of_n", "rejection_sampling")]
    assert by["eval"].eval.report == str(tmp_path / "report.md")
    for name, cfg in by.items():
        assert cfg.stage.name == {"grpo_rm": "grpo"}.get(name, name) and cfg.run.dir == str(tmp_path / name)
        assert cfg.seed == 7 and cfg.model.hidden_size == 64  # command line and recipe.common
        # The command line wins over the recipe's step overrides; a step's extra wins over both.
        assert cfg.train.steps == (2 if name == "dpo" else 9)
    assert by["dpo"].dpo.beta == 0.3 and by["sft"].dpo.beta != 0.3
    assert {s.name: s.needs for s in steps}["ppo"] == ["sft", "rm"]


def test_a_subset_uses_finished_steps_and_refuses_missing_inputs(tmp_path: Path) -> None:
    _, steps, errors = _steps(tmp_path, "recipe.only=[sft,dpo]")
    assert steps == [] or errors
    assert any("reads ckpt.load from pretrain" in e for e in errors), errors
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / DONE_FILE).write_text(json.dumps({"stage": "pretrain", "steps": 6}))
    _, steps, errors = _steps(tmp_path, "recipe.only=[sft,dpo,eval]")
    assert errors == [], errors
    assert [s.name for s in steps] == ["sft", "dpo", "eval"]
    evaluated = steps[-1].cfg.eval
    # Evaluation takes what exists: the finished pretrain run and the steps that run now.
    assert evaluated.models.split(",") == [str(tmp_path / n) for n in ("pretrain", "sft", "dpo")]
    assert evaluated.baseline == str(tmp_path / "sft") and evaluated.reward == ""


@pytest.mark.parametrize("args,expected", [
    (["stage=sft"], "a recipe sets each step's stage"),
    (["recipe=nope"], "recipe=nope: no such option in group 'recipe'"),
    (["recipe.only=[sft,typo]"], "recipe.only=['sft', 'typo']: no step ['typo']"),
    (["parallel.tp=3"], "recipe step pretrain: parallel.tp=3"),
    (['recipe.steps.sft.extra=["data=chatml"]'], "recipe step sft: data.path"),
    (["-m", "seed=1,2"], "-m: a recipe is a chain of runs of its own"),
])
def test_bad_recipe_input_stops_before_anything_runs(args: list[str], expected: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["recipe=smoke", f"run.dir={tmp_path / 'run'}", *args]
    if args[0] == "recipe=nope":
        argv = argv[1:]
    if args[0] == "-m":  # a flag goes before the overrides
        argv = ["-m", *argv[:2], *args[1:]]
    import sys

    sys.argv = ["chatforge", *argv]
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert not (tmp_path / "run").exists()  # nothing written


def test_done_means_finished_and_for_training_at_the_configured_steps(tmp_path: Path) -> None:
    _, steps, _ = _steps(tmp_path)
    by = {s.name: s for s in steps}
    sft, bon = by["sft"], by["best_of_n"]
    assert not is_done(sft.run_dir, sft.cfg)
    sft.run_dir.mkdir()
    (sft.run_dir / DONE_FILE).write_text(json.dumps({"stage": "sft", "steps": 3}))
    assert not is_done(sft.run_dir, sft.cfg)  # train.steps=4 in the smoke recipe: resume
    (sft.run_dir / DONE_FILE).write_text(json.dumps({"stage": "sft", "steps": 4}))
    assert is_done(sft.run_dir, sft.cfg)
    bon.run_dir.mkdir()
    (bon.run_dir / DONE_FILE).write_text(json.dumps({"stage": "best_of_n", "steps": 0}))
    assert is_done(bon.run_dir, bon.cfg)


def test_slurm_chain_depends_on_inputs_skips_done_steps_and_keeps_live_jobs(tmp_path: Path) -> None:
    _, steps, _ = _steps(tmp_path)
    by = {s.name: s for s in steps}
    by["tokenizer"].run_dir.mkdir()
    (by["tokenizer"].run_dir / DONE_FILE).write_text(json.dumps({"stage": "tokenizer", "steps": 0}))
    submitted: list[tuple[str, list[str]]] = []

    def submit(cfg: Any, step: Step, after: list[str]) -> str:
        submitted.append((step.name, after))
        return str(100 + len(submitted))

    def active(run_dir: Path) -> str | None:
        return "77" if run_dir.name == "rm" else None  # an earlier submission still queued

    jobs = submit_steps(steps, tmp_path, submit, active)
    assert "tokenizer" not in jobs and jobs["rm"] == "77"
    after = dict(submitted)
    assert after["pretrain"] == []  # its input finished: nothing to wait for
    assert after["sft"] == [jobs["pretrain"]]
    assert after["ppo"] == sorted([jobs["sft"], "77"])
    assert set(after["eval"]) == {jobs[n] for n in ("pretrain", "sft", "ppo", "a2c", "grpo", "grpo_rm", "dpo",
                                                    "best_of_n", "rejection_sampling")} | {"77"}
