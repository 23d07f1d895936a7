"""`chatforge`: compose -> validate -> write the resolved config -> run the ranks.

Hydra's own `main` runs the jobs (so `-m` sweeps, `--cfg job`, `--help` and tab completion
work as Hydra users expect), but only after a preflight that composes and validates EVERY
sweep point with Hydra's compose API: a bad option or value then stops the command before
any run directory or process exists, with one line per error on stderr and exit code 2.

Subcommands: `chatforge [run] <overrides>` runs the job (each -m point; then a summary);
`chatforge plan <overrides>` validates every point and prints its layout, memory and cost
without starting anything; `chatforge jobs | logs <run> | cancel <run>` manage SLURM runs.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from launcher.failures import failure_report
from launcher.local import run_local
from launcher.recipe import is_done
from launcher.resolved import write_resolved_config
from launcher.schema import CONF_DIR, register_schema
from launcher.sweep import ALREADY_DONE, PointResult, summarize
from trainer.exitcodes import DONE_FILE  # torch-free
from launcher.validate import find_errors
from launcher.validate_run import find_warnings

CONFIG_NAME = "config"
USAGE_ERROR = 2


@dataclass
class Point:
    """One job of the command: a run, or one point of a -m sweep."""

    overrides: list[str]
    cfg: DictConfig
    run_dir: Path
    # Legal but surely unintended settings (launcher/validate_run.py), printed before it runs.
    warnings: list[str] = field(default_factory=list)


# Hydra message lines that locate the problem for developers, not for users.
_NOISE = re.compile(
    r"^\s*(full_key:|reference_type=|object_type=|Config search path|provider=|See https)")


def error_line(exc: Exception, overrides: list[str]) -> str:
    """One `<key>=<value>: <what is wrong>` line for a Hydra composition error."""
    from hydra.errors import MissingConfigException

    missing = getattr(exc, "missing_cfg_file", None)
    if isinstance(exc, MissingConfigException) and missing and "/" in missing:
        group, option = missing.rsplit("/", 1)
        available = ", ".join(exc.options or []) or "none"
        return f"{group}={option}: no such option in group '{group}' (available: {available})"
    lines: list[str] = []
    cause: Optional[BaseException] = exc
    while cause is not None:
        lines += [line.strip().rstrip(".") for line in str(cause).splitlines()
                  if line.strip() and not _NOISE.match(line)]
        cause = cause.__cause__
    message = "; ".join(dict.fromkeys(lines)) or type(exc).__name__
    pairs = [o.lstrip("~+").partition("=") for o in overrides]
    for key, _, value in sorted(pairs, key=lambda pair: -len(pair[0])):
        if key and re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message):
            return f"{key}={value}: {message}"
    return message


def _sweep(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job, expanded the way Hydra's basic sweeper does."""
    if not multirun:
        return [list(overrides)]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]


def _primary_dir(config_path: Optional[str]) -> str:
    """Hydra's --config-path rule: absolute, or relative to the file that calls hydra.main."""
    if config_path is None:
        return str(CONF_DIR)
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), config_path))


def _compose_points(jobs: list[list[str]], multirun: bool, config_name: str, primary: str,
                    device: bool) -> tuple[list[Point], list[tuple[str, int]]]:
    from hydra import compose, initialize_config_dir

    points, errors = [], []
    with initialize_config_dir(config_dir=primary, version_base="1.3", job_name="chatforge"):
        for index, job in enumerate(jobs):
            try:
                cfg = compose(config_name=config_name, overrides=job)
            except Exception as exc:  # any composition failure is a usage error here
                errors.append((error_line(exc, job), index))
                continue
            if not str(cfg.run.dir or "").strip():
                errors.append((f"run.dir={cfg.run.dir!r}: must name a directory (empty would fill "
                               "the current directory with run files)", index))
                continue
            run_dir = Path(cfg.run.dir).absolute()
            # Mirrors hydra.sweep.dir=${run.dir}, hydra.sweep.subdir=${hydra.job.num}.
            cfg.run.dir = str(run_dir / str(index) if multirun else run_dir)
            found = find_errors(cfg, device=device)
            errors += [(str(error), index) for error in found]
            points.append(Point(job, cfg, Path(cfg.run.dir), [] if found else find_warnings(cfg, Path(cfg.run.dir))))
    return points, errors


def preflight(overrides: list[str], multirun: bool, config_name: str = "config",
              config_dir: Optional[str] = None, config_path: Optional[str] = None,
              device: bool = True) -> tuple[list[Point], list[str]]:
    """Compose and validate every job of the command before anything starts.

    Returns the points and the error lines; an error found in only some points of a sweep
    names them. Nothing is created on disk. `device=False` (plan): skip the check of this
    machine's devices."""
    register_schema()
    jobs_overrides = list(overrides)
    if config_dir is not None:
        if not os.path.isdir(config_dir):
            return [], [f"--config-dir={config_dir}: no such directory"]
        jobs_overrides.append(f"hydra.searchpath=[file://{os.path.abspath(config_dir)}]")
    try:
        jobs = _sweep(jobs_overrides, multirun)
        points, errors = _compose_points(jobs, multirun, config_name, _primary_dir(config_path), device)
    except Exception as exc:  # a parse error in the overrides, a missing primary config
        return [], [error_line(exc, jobs_overrides)]
    where: dict[str, list[int]] = {}
    for line, index in errors:
        where.setdefault(line, []).append(index)
    lines = []
    for line, indices in where.items():
        if multirun and len(indices) < len(jobs):
            line += f" (sweep points {', '.join(map(str, indices))})"
        lines.append(line)
    return points, lines


def _warn(points: list[Point]) -> None:
    for index, point in enumerate(points):
        where = f" (sweep point {index})" if len(points) > 1 else ""
        for line in point.warnings:
            print(f"chatforge: warning: {line}{where}", file=sys.stderr)


def _fail(lines: list[str]) -> int:
    for line in lines:
        print(f"chatforge: error: {line}", file=sys.stderr)
    return USAGE_ERROR


def world_size(cfg: DictConfig) -> int:
    return int(cfg.cluster.nodes) * int(cfg.cluster.procs_per_node)


def _run_on_local(cfg: DictConfig, config_path: Path) -> int:
    return run_local(
        [sys.executable, "-m", "trainer", str(config_path)],
        world_size=world_size(cfg),
        run_dir=Path(cfg.run.dir),
        env_extra={},
        threads=int(cfg.cluster.threads_per_proc),
        hang_timeout=float(cfg.train.hang_timeout),
    )


def _run_on_slurm(cfg: DictConfig, config_path: Path) -> int:
    from launcher.slurm import run_on_slurm  # submitit only when SLURM is used

    return run_on_slurm(cfg, config_path)


# cluster.name -> how a job with a written config is run (and waited for).
BACKENDS: dict[str, Callable[[DictConfig, Path], int]] = {
    "local": _run_on_local, "slurm": _run_on_slurm}


def _sweep_point(cfg: DictConfig, config_path: Path, results: list[PointResult]) -> None:
    """One -m point: run it (local) or submit it (SLURM); failures are recorded, not raised,
    so that the other points still run and the summary reports every one."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    point = PointResult(num=int(hc.job.num), overrides=list(hc.overrides.task),
                        run_dir=Path(cfg.run.dir), sweep_dir=Path(hc.sweep.dir).absolute())
    if is_done(point.run_dir, cfg):
        # Rerunning a sweep resumes only the points that did not finish.
        point.code, point.state = 0, ALREADY_DONE
        print(f"chatforge: sweep point {point.num}: already done ({DONE_FILE}), skipped", flush=True)
    elif cfg.cluster.name == "slurm":
        from launcher.slurm import submit

        sub = submit(cfg, config_path)
        point.job_id = sub.job_id
        print(f"chatforge: sweep point {point.num} submitted as job {sub.job_id}", flush=True)
    else:
        point.code = BACKENDS[cfg.cluster.name](cfg, config_path)
        if point.code in (130, 143):  # Ctrl-C / SIGTERM to the launcher stops the whole sweep
            sys.exit(point.code)
        if point.code:
            point.error = failure_report(point.run_dir)
    results.append(point)


def run_job(cfg: DictConfig, results: Optional[list[PointResult]] = None) -> None:
    """Hydra task function: one run (or one sweep point) in its own run directory.

    Hydra has already created the output dir, hydra.run.dir (= run.dir) or, in a sweep,
    hydra.sweep.dir/hydra.sweep.subdir (= <run.dir>/<job num>); it becomes this job's run.dir.
    A single run exits with the job's code on failure; a sweep point records its outcome in
    `results` for the summary."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    cfg = copy.deepcopy(cfg)
    cfg.run.dir = str(Path(HydraConfig.get().runtime.output_dir).absolute())
    errors = find_errors(cfg)  # again: the preflight saw the same config, but cheap insurance
    if errors:
        sys.exit(_fail([str(error) for error in errors]))
    config_path = write_resolved_config(cfg, Path(cfg.run.dir))
    if HydraConfig.get().mode == RunMode.MULTIRUN and results is not None:
        _sweep_point(cfg, config_path, results)
        return
    code = BACKENDS[cfg.cluster.name](cfg, config_path)
    if code:
        sys.exit(code)


def _parse(argv: list[str]) -> argparse.Namespace:
    from hydra._internal.utils import get_args_parser  # the exact parser hydra.main uses

    return get_args_parser().parse_args(argv)


def _runs_jobs(args: argparse.Namespace) -> bool:
    """False for Hydra's informational flags (--help, --cfg, --info ...): nothing runs."""
    return not (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion
                or args.experimental_rerun)


def _points(args: argparse.Namespace, device: bool = True) -> tuple[list[Point], list[str]]:
    return preflight(args.overrides, multirun=args.multirun,
                     config_name=args.config_name or CONFIG_NAME,
                     config_dir=args.config_dir, config_path=args.config_path, device=device)


def _recipe_steps(args: argparse.Namespace) -> tuple[Optional[DictConfig], list[Any], list[str]]:
    """(the root config, every step composed, errors) of `chatforge recipe=<name> ...`."""
    from hydra import compose, initialize_config_dir

    from launcher.recipe import RecipeError, compose_steps

    if args.multirun:
        return None, [], ["-m: a recipe is a chain of runs of its own; sweep a stage, not a recipe"]
    name = args.config_name or CONFIG_NAME
    search = ([f"hydra.searchpath=[file://{os.path.abspath(args.config_dir)}]"]
              if args.config_dir is not None else [])

    def compose_step(step_overrides: list[str]) -> DictConfig:
        try:
            return compose(config_name=name, overrides=step_overrides + search)
        except Exception as exc:  # a composition failure is a usage error: one line
            raise RecipeError(error_line(exc, step_overrides)) from exc

    register_schema()
    with initialize_config_dir(config_dir=_primary_dir(args.config_path), version_base="1.3", job_name="chatforge"):
        try:
            root = compose_step(list(args.overrides))
            steps, errors = compose_steps(root, list(args.overrides), compose_step)
        except RecipeError as exc:
            return None, [], [str(exc)]
    return root, steps, errors


def recipe_command(args: argparse.Namespace, plan_only: bool = False) -> int:
    """`chatforge [plan] recipe=<name> ...`: validate every step, then run the chain locally
    or submit it to SLURM as dependent jobs (launcher/recipe.py)."""
    from launcher.recipe import describe, run_steps

    root_cfg, steps, errors = _recipe_steps(args)
    if errors or root_cfg is None:
        return _fail(errors)
    root = Path(str(root_cfg.run.dir)).absolute()
    if plan_only:
        print(f"# recipe={root_cfg.recipe.name} run.dir={root}\n{describe(steps)}")
        for step in steps:
            print(f"## step {step.name}: chatforge {' '.join(step.overrides)}")
        return 0
    if root_cfg.cluster.name == "slurm":
        from launcher.slurm import run_recipe_on_slurm

        return run_recipe_on_slurm(steps, root, bool(root_cfg.cluster.wait))

    def run_step(cfg: DictConfig) -> int:
        return BACKENDS[cfg.cluster.name](cfg, write_resolved_config(cfg, Path(str(cfg.run.dir))))

    from launcher.zygote import started

    # A dozen launches of the trainer: fork their ranks from one process that imported torch
    # and megatron once (launcher/zygote.py), about 6 s of CPU saved per launch.
    with started(root / "logs" / "zygote.log"):
        return run_steps(steps, root, run_step)


def run_command(argv: list[str]) -> int:
    """Default command: preflight every point, then run the one job, or let Hydra's sweeper
    run every point of a -m sweep (and summarize them); a recipe runs its chain."""
    import hydra

    from launcher.recipe import is_recipe

    args = _parse(argv)
    register_schema()  # also needed by --help/--cfg, which skip the preflight
    if _runs_jobs(args) and is_recipe(args.overrides):
        return recipe_command(args)
    if _runs_jobs(args):
        points, errors = _points(args)
        if errors:
            return _fail(errors)
        _warn(points)
        if not args.multirun:
            # The preflight already composed the one job exactly as hydra.main would (same
            # overrides, same search path): run it without composing twice (~0.5 s).
            config_path = write_resolved_config(points[0].cfg, points[0].run_dir)
            return BACKENDS[points[0].cfg.cluster.name](points[0].cfg, config_path)
    sys.argv = [sys.argv[0], *argv]  # hydra.main parses sys.argv itself
    results: list[PointResult] = []

    def task(cfg: DictConfig) -> None:
        run_job(cfg, results)

    hydra.main(config_path=str(CONF_DIR), config_name=CONFIG_NAME, version_base="1.3")(task)()
    return summarize(results) if args.multirun and _runs_jobs(args) else 0


def plan_command(argv: list[str]) -> int:
    """Validate every point and print its resolved config, rank layout, memory per device,
    time and cost (and, for SLURM, the batch script); submits nothing, writes nothing."""
    from launcher.plan import format_plan

    args = _parse(argv)
    from launcher.recipe import is_recipe

    if is_recipe(args.overrides):
        return recipe_command(args, plan_only=True)
    points, errors = _points(args, device=False)
    if errors:
        return _fail(errors)
    _warn(points)
    for index, point in enumerate(points):
        cfg = point.cfg
        world = world_size(cfg)
        dp = world // (cfg.parallel.tp * cfg.parallel.pp)
        print(f"# point {index}: run.dir={point.run_dir} stage={cfg.stage.name} "
              f"model={cfg.model.name} cluster={cfg.cluster.name} world={world} "
              f"tp={cfg.parallel.tp} pp={cfg.parallel.pp} dp={dp} "
              f"overrides=[{' '.join(point.overrides)}]")
        print("## resolved config\n" + OmegaConf.to_yaml(cfg, resolve=True).rstrip())
        print("## plan\n" + format_plan(cfg))
        if cfg.cluster.name == "slurm":
            from launcher.slurm import sbatch_script

            print("## sbatch script (submitit writes it at submission)\n" + sbatch_script(cfg))
    return 0


def _jobs(argv: list[str]) -> int:
    from launcher.jobs import jobs_command

    return jobs_command(argv)


def _logs(argv: list[str]) -> int:
    from launcher.jobs import logs_command

    return logs_command(argv)


def _cancel(argv: list[str]) -> int:
    from launcher.jobs import cancel_command

    return cancel_command(argv)


def _chat(argv: list[str]) -> int:
    """Interactive chat with a checkpoint: one local process (trainer/chat.py), stdin and
    stdout passed through. Arguments are checked here first, without torch."""
    import subprocess

    from trainer.chat import HELP, parse_args

    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return 0
    try:
        args = parse_args(argv)
    except ValueError as exc:
        return _fail([str(exc)])
    for key in ("ckpt", "examples"):
        if args.get(key) and not Path(args[key]).expanduser().exists():
            return _fail([f"{key}={args[key]}: no such file or directory"])
    return subprocess.call([sys.executable, "-m", "trainer.chat", *argv])


def _tool(module: str) -> Callable[[list[str]], int]:
    """A subcommand that is a tools/ module in its own process (the launcher stays torch-free)."""
    def command(argv: list[str]) -> int:
        import subprocess

        return subprocess.call([sys.executable, "-m", module, *argv])
    return command


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "run": run_command, "plan": plan_command, "jobs": _jobs, "logs": _logs, "cancel": _cancel,
    "chat": _chat, "import-hf": _tool("tools.hf_import"), "export-hf": _tool("tools.hf_export")}


def main() -> None:
    """Console script `chatforge`: an optional subcommand, then Hydra's command line."""
    argv = sys.argv[1:]
    name = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    sys.exit(COMMANDS[name](argv))




if __name__ == "__main__":
    main()
