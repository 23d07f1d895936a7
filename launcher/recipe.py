"""`chatforge recipe=<name>`: the whole pipeline as a chain of ordinary runs.

A recipe (conf/recipe/<name>.yaml, schema chatforge_config.launcher.RecipeConfig) lists steps in
order; step <name> is one chatforge run in <run.dir>/<name>/ with `stage=<its stage>`, the
recipe's overrides (recipe.common, then the step's), the command line's (every step), the user's per-step
`recipe.steps.<name>.extra`, and its inputs: config keys set to earlier steps' run dirs
(ckpt.load=<run.dir>/sft). Before anything runs, every step is composed and validated
(paths that an earlier step will write count as present).

Running: a step whose run dir holds trainer.exitcodes.DONE_FILE (for a training stage: with
train.steps reached) is skipped; any other step runs, and resumes from its own checkpoint if
it has one. Locally the steps run one after another and the chain stops at a failure; on
SLURM every step is a job submitted at once with `--dependency=afterok:<its inputs' jobs>`
(and --kill-on-invalid-dep, so the rest of a chain whose step failed is cancelled rather
than left pending); a step whose earlier job is still queued or running is not submitted
twice, its job becomes the dependency. Rerunning the same command continues a chain.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from launcher.validate import find_errors
from trainer.exitcodes import DONE_FILE, EXIT_REQUEUE  # torch-free
from trainer.stages import NO_TRAINING

# Input keys whose value is a file of the input step's run, not the run dir itself.
INPUT_FILES: dict[str, str] = {"tokenizer.path": "tokenizer/tokenizer.model"}
# Inputs that are dropped, not an error, when their step neither runs nor has finished
# (`recipe.only` without it): the evaluation evaluates what exists.
OPTIONAL_INPUTS: tuple[str, ...] = ("eval.models", "eval.runs", "eval.baseline", "eval.reward")
REPORT = "report.md"


@dataclass
class Step:
    name: str
    stage: str
    run_dir: Path
    needs: list[str]  # the steps whose outputs it reads
    overrides: list[str] = field(default_factory=list)
    cfg: Optional[DictConfig] = None


def is_recipe(overrides: list[str]) -> bool:
    return any(_key(o) == "recipe" for o in overrides)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def is_done(run_dir: Path, cfg: DictConfig) -> bool:
    """Whether the run in `run_dir` finished (and, training, reached cfg.train.steps)."""
    path = run_dir / DONE_FILE
    if not path.is_file():
        return False
    try:
        done = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return cfg.stage.name in NO_TRAINING or int(done.get("steps", 0)) >= int(cfg.train.steps)


def _names(value: str) -> list[str]:
    return [n.strip() for n in str(value).split(",") if n.strip()]


class RecipeError(ValueError):
    """A recipe that cannot run: one line naming the recipe key and what is wrong."""


def plan_steps(recipe: Any, root: Path) -> list[Step]:
    """The recipe's steps in order, with the steps each reads; checks names and `only`."""
    steps = [Step(name, str(s.stage), root / name, []) for name, s in recipe.steps.items()]
    known = [s.name for s in steps]
    if not steps:
        raise RecipeError(f"recipe={recipe.name}: recipe.steps is empty")
    for step in steps:
        spec = recipe.steps[step.name]
        if not step.stage:
            raise RecipeError(f"recipe.steps.{step.name}.stage: missing")
        for key, value in spec.inputs.items():
            for needed in _names(value):
                if needed not in known[:known.index(step.name)]:
                    raise RecipeError(f"recipe.steps.{step.name}.inputs.{key}={value}: {needed!r} is not an "
                                      f"earlier step (steps: {', '.join(known)})")
                if needed not in step.needs:
                    step.needs.append(needed)
    unknown = [n for n in recipe.only if n not in known]
    if unknown:
        raise RecipeError(f"recipe.only={list(recipe.only)}: no step {unknown} (steps: {', '.join(known)})")
    return steps


def step_overrides(recipe: Any, step: Step, user: list[str], root: Path, available: set[str]) -> list[str]:
    """The Hydra overrides that compose this step's config (see the module docstring)."""
    spec = recipe.steps[step.name]
    inputs = []
    for key, value in spec.inputs.items():
        names = [n for n in _names(value) if n in available]
        missing = [n for n in _names(value) if n not in available]
        if missing and key not in OPTIONAL_INPUTS:
            raise RecipeError(f"recipe.only: step {step.name} reads {key} from {', '.join(missing)}, which "
                              f"neither runs now nor has finished in {root}")
        paths = ",".join(str(root / n / INPUT_FILES[key]) if key in INPUT_FILES else str(root / n) for n in names)
        inputs.append(f"{key}='{paths}'")  # quoted: Hydra would read a bare a,b as a sweep
    derived = [f"stage={step.stage}", f"run.dir='{step.run_dir}'"]
    if step.stage == "eval":
        derived.append(f"eval.report='{root / REPORT}'")
    return [*recipe.common, *spec.overrides, *user, *spec.extra, *derived, *inputs]


def user_overrides(overrides: list[str]) -> list[str]:
    """The command line's overrides that every step gets (the recipe's own keys removed)."""
    out = []
    for o in overrides:
        key = _key(o)
        if key == "stage" or key.startswith("stage."):
            raise RecipeError(f"{o}: a recipe sets each step's stage; pick steps with recipe.only=[...]")
        if key == "run.dir" or key == "recipe" or key.startswith("recipe."):
            continue
        out.append(o)
    return out


def compose_steps(root_cfg: DictConfig, overrides: list[str], compose: Any) -> tuple[list[Step], list[str]]:
    """Every step's config, composed with `compose(overrides) -> DictConfig` (which raises
    RecipeError for a bad override), and the errors, each naming its step. Writes nothing."""
    recipe, root = root_cfg.recipe, Path(str(root_cfg.run.dir)).absolute()
    steps = plan_steps(recipe, root)
    chosen = set(recipe.only) or {s.name for s in steps}
    user = user_overrides(overrides)
    errors: list[str] = []
    available: set[str] = set()
    pending: set[str] = set()
    for step in steps:
        if step.name not in chosen:
            probe = compose([*recipe.common, *recipe.steps[step.name].overrides, *user, f"stage={step.stage}"])
            if is_done(step.run_dir, probe):
                available.add(step.name)
            continue
        # Counted as available even if it has errors: each error is reported once, at its step.
        step.needs = [n for n in step.needs if n in available]
        available.add(step.name)
        pending.update({str(step.run_dir), str(step.run_dir / INPUT_FILES["tokenizer.path"])})
        try:
            step.overrides = step_overrides(recipe, step, user, root, available - {step.name})
            step.cfg = compose(step.overrides)
        except RecipeError as exc:  # one line already: report every step's, then stop
            errors.append(f"recipe step {step.name}: {exc}")
            continue
        errors += [f"recipe step {step.name}: {e}" for e in find_errors(step.cfg, pending=frozenset(pending))]
    return [s for s in steps if s.cfg is not None], errors


def describe(steps: list[Step]) -> str:
    lines = []
    for i, step in enumerate(steps, 1):
        state = "done" if step.cfg is not None and is_done(step.run_dir, step.cfg) else "to run"
        after = f" after {', '.join(step.needs)}" if step.needs else ""
        lines.append(f"  {i}. {step.name:<20} stage={step.stage:<18} {state}{after}")
    return "\n".join(lines)


def run_steps(steps: list[Step], root: Path, run_step: Any) -> int:
    """Locally: each unfinished step in order; stop at the first failure."""
    todo = [s for s in steps if not is_done(s.run_dir, s.cfg)]
    print(f"chatforge: recipe in {root}: {len(steps)} steps, {len(todo)} to run\n{describe(steps)}", flush=True)
    for i, step in enumerate(steps, 1):
        if step not in todo:
            print(f"chatforge: recipe step {i}/{len(steps)} {step.name}: done, skipped", flush=True)
            continue
        print(f"chatforge: recipe step {i}/{len(steps)} {step.name} (stage={step.stage}) -> {step.run_dir}",
              flush=True)
        code = run_step(step.cfg)
        if code:
            print(f"chatforge: recipe step {step.name} failed (exit {code}); fix it and rerun the same "
                  f"command: finished steps are skipped, this one resumes", file=sys.stderr, flush=True)
            return int(code)
        if not is_done(step.run_dir, step.cfg):
            # train.max_minutes or train.exit_interval stopped it early, after a checkpoint: the
            # next steps must not start from an unfinished input.
            print(f"chatforge: recipe step {step.name} stopped before its end (saved); rerun the same "
                  f"command to continue it and the rest", file=sys.stderr, flush=True)
            return EXIT_REQUEUE
    report = root / REPORT
    if report.is_file():
        print(f"chatforge: recipe done; report: {report}", flush=True)
    return 0


def submit_steps(steps: list[Step], root: Path, submit: Any, active_job: Any) -> dict[str, str]:
    """On SLURM: submit every unfinished step, each after its inputs' jobs. `submit(cfg,
    step, after)` returns a job id; `active_job(run_dir)` the id of a queued or running job
    of an earlier submission (or None). Returns step name -> job id."""
    jobs: dict[str, str] = {}
    for step in steps:
        if is_done(step.run_dir, step.cfg):
            print(f"chatforge: recipe step {step.name}: done, skipped", flush=True)
            continue
        running = active_job(step.run_dir)
        if running:
            jobs[step.name] = running
            print(f"chatforge: recipe step {step.name}: job {running} still queued or running; kept", flush=True)
            continue
        after = sorted({jobs[n] for n in step.needs if n in jobs})
        jobs[step.name] = submit(step.cfg, step, after)
        print(f"chatforge: recipe step {step.name}: job {jobs[step.name]}"
              + (f" after {','.join(after)}" if after else ""), flush=True)
    return jobs
