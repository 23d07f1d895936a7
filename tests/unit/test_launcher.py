"""Launcher: composition, validation, the CLI's error contract and local process runs (CPU)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from chatforge_config.trainer import Config
from launcher.cli import preflight
from launcher.errors import ConfigError
from launcher.local import run_local
from launcher.validate import CHOICES, find_errors, validate

REPO = Path(__file__).resolve().parents[2]
CHATFORGE = Path(sys.executable).parent / "chatforge"


def compose(*overrides: str) -> DictConfig:
    points, errors = preflight(list(overrides), multirun=False)
    assert len(points) == 1, errors
    return points[0].cfg


def structured(**values: object) -> DictConfig:
    """The schema defaults with dotted keys set, e.g. structured(**{"parallel.tp": 2})."""
    cfg = OmegaConf.structured(Config)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def only_error(cfg: DictConfig) -> ConfigError:
    errors = find_errors(cfg)
    assert len(errors) == 1, [str(e) for e in errors]
    return errors[0]


# ---- import hygiene -------------------------------------------------------------------------

def test_launcher_import_leaves_torch_out() -> None:
    code = ("import launcher, launcher.cli, launcher.validate, launcher.local, launcher.schema; "
            "import launcher.slurm, launcher.slurm_task, launcher.plan, launcher.sweep; "
            "import launcher.jobs, launcher.validate_cluster, launcher.validate_run, launcher.devices; "
            "import submitit; from launcher.cli import preflight; "
            # the checks that sniff data, count the tokenizer's characters, look for GPUs
            "preflight(['tokenizer.vocab_size=300', 'run.dir=/nonexistent-dir/run'], False); "
            "import sys; assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- composition ----------------------------------------------------------------------------

def test_default_config_composes_with_expected_groups() -> None:
    points, errors = preflight([], multirun=False)
    assert errors == []
    cfg = points[0].cfg
    assert cfg.stage.name == "pretrain"
    assert (cfg.model.name, cfg.model.num_layers, cfg.model.hidden_size) == ("tiny", 2, 64)
    assert (cfg.model.num_attention_heads, cfg.model.seq_length) == (4, 128)
    assert (cfg.parallel.tp, cfg.parallel.pp) == (1, 1)
    assert cfg.cluster.name == "local"
    assert (cfg.data.name, cfg.data.format) == ("embedded", "embedded")
    assert "hydra" not in cfg


MODEL_SHAPES = {
    "gpt_125m": dict(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=1024,
                     position_embedding="learned", normalization="LayerNorm",
                     activation="gelu", tie_embeddings=True),
    "gpt_350m": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, seq_length=1024,
                     position_embedding="learned", normalization="LayerNorm",
                     activation="gelu", tie_embeddings=True),
    "gpt_1p3b": dict(num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=2048,
                     position_embedding="learned", normalization="LayerNorm",
                     activation="gelu", tie_embeddings=True),
    "llama2_7b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32,
                      ffn_hidden_size=11008, seq_length=4096, position_embedding="rope",
                      normalization="RMSNorm", activation="swiglu", tie_embeddings=False,
                      add_bias=False, layernorm_epsilon=1e-5),
}


@pytest.mark.parametrize("name", sorted(MODEL_SHAPES))
def test_model_options_have_the_real_shapes(name: str) -> None:
    # Guards against a ModelConfig default changing under a YAML that relies on it.
    model = compose(f"model={name}").model
    assert model.name == name
    for key, value in MODEL_SHAPES[name].items():
        assert model[key] == value, key


@pytest.mark.parametrize("option,tp,pp", [("single", 1, 1), ("tp2", 2, 1), ("pp2", 1, 2),
                                          ("tp2pp2", 2, 2)])
def test_parallel_options(option: str, tp: int, pp: int) -> None:
    cfg = compose(f"parallel={option}", "cluster.procs_per_node=4")
    assert (cfg.parallel.tp, cfg.parallel.pp) == (tp, pp)


def test_group_option_names_match_their_files() -> None:
    for group in ("stage", "model", "cluster", "data"):
        for path in sorted((REPO / "conf" / group).glob("*.yaml")):
            extra = ["data.path=/dev/null"] if path.stem == "text" else []
            assert compose(f"{group}={path.stem}", *extra)[group].name == path.stem


def test_multirun_points_get_their_own_run_dirs(tmp_path: Path) -> None:
    points, errors = preflight([f"run.dir={tmp_path}", "optim.lr=0.1,0.2"], multirun=True)
    assert errors == []
    assert [p.run_dir for p in points] == [tmp_path / "0", tmp_path / "1"]
    assert [p.cfg.optim.lr for p in points] == [0.1, 0.2]


# ---- validation -----------------------------------------------------------------------------

def test_defaults_and_real_layouts_are_valid() -> None:
    assert find_errors(structured()) == []
    assert find_errors(compose("parallel=tp2pp2", "cluster.procs_per_node=4",
                               "train.global_batch=8", "train.micro_batch=2")) == []
    # A layout for a bigger machine than this one: the device check (memory here) is left out.
    assert find_errors(compose("model=llama2_7b", "parallel=tp2pp2", "cluster.procs_per_node=8",
                               "train.global_batch=16"), device=False) == []


def test_tp_not_dividing_heads_names_tp() -> None:
    # tp=3 also fails the vocabulary split; the heads rule comes first.
    error = find_errors(structured(**{"parallel.tp": 3, "cluster.procs_per_node": 3}))[0]
    assert (error.key, error.value) == ("parallel.tp", 3)
    assert str(error).startswith("parallel.tp=3: ")
    assert "num_attention_heads=4" in str(error)


def test_world_not_divisible_by_tp_names_tp_and_world() -> None:
    error = only_error(structured(**{"parallel.tp": 4, "cluster.procs_per_node": 6}))
    assert str(error).startswith("parallel.tp=4: ")
    assert "cluster.procs_per_node=6" in str(error)


def test_world_not_divisible_by_tp_times_pp_names_pp() -> None:
    error = only_error(structured(**{"parallel.tp": 2, "parallel.pp": 2,
                                     "cluster.procs_per_node": 2}))
    assert str(error).startswith("parallel.pp=2: ")


def test_layers_not_divisible_by_pp() -> None:
    error = only_error(structured(**{"parallel.pp": 4, "cluster.procs_per_node": 4,
                                     "train.global_batch": 8, "model.num_layers": 6}))
    assert str(error).startswith("model.num_layers=6: ")
    assert "parallel.pp=4" in str(error)


def test_global_batch_not_divisible_by_micro_times_dp() -> None:
    error = only_error(structured(**{"cluster.procs_per_node": 3}))  # 8 % (2 * 3) != 0
    assert (error.key, error.value) == ("train.global_batch", 8)
    assert str(error).startswith("train.global_batch=8: ")


def test_query_groups_must_split_over_tp() -> None:
    error = only_error(structured(**{"parallel.tp": 2, "cluster.procs_per_node": 2,
                                     "model.num_query_groups": 1}))
    assert str(error).startswith("model.num_query_groups=1: ")


def test_steps_and_sizes_must_be_positive() -> None:
    error = only_error(structured(**{"train.steps": 0}))
    assert str(error).startswith("train.steps=0: ")
    error = only_error(structured(**{"cluster.procs_per_node": 0}))
    assert str(error).startswith("cluster.procs_per_node=0: ")


def test_local_cluster_is_one_node() -> None:
    error = only_error(structured(**{"cluster.nodes": 2}))
    assert str(error).startswith("cluster.nodes=2: ")


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_bad_enum_names_key_value_and_choices(key: str) -> None:
    error = only_error(structured(**{key: "bogus"}))
    assert str(error).startswith(f"{key}=bogus: ")
    assert ", ".join(CHOICES[key]) in str(error)


def test_text_data_needs_an_existing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    error = only_error(structured(**{"data.format": "text", "data.path": str(missing)}))
    assert str(error).startswith(f"data.path={missing}: ")
    error = only_error(structured(**{"data.format": "text"}))
    assert str(error).startswith("data.path='': ")
    present = tmp_path / "a.txt"
    present.write_text("hello\n")
    both = f"{present},{missing}"
    error = only_error(structured(**{"data.format": "text", "data.path": both}))
    assert error.key == "data.path" and str(missing) in error.message
    assert str(present) not in error.message
    assert find_errors(structured(**{"data.format": "text", "data.path": str(present)})) == []


def test_tokenizer_and_checkpoint_paths_must_exist(tmp_path: Path) -> None:
    error = only_error(structured(**{"tokenizer.path": str(tmp_path / "sp.model")}))
    assert str(error).startswith(f"tokenizer.path={tmp_path / 'sp.model'}: ")
    error = only_error(structured(**{"ckpt.load": str(tmp_path / "ckpts")}))
    assert str(error).startswith(f"ckpt.load={tmp_path / 'ckpts'}: ")
    (tmp_path / "ckpts").mkdir()
    assert find_errors(structured(**{"ckpt.load": str(tmp_path / "ckpts")})) == []


def test_validate_raises_the_first_error() -> None:
    with pytest.raises(ConfigError) as info:
        validate(structured(**{"train.steps": 0, "model.activation": "relu"}))
    assert info.value.key == "model.activation"  # enums are checked first
    validate(structured())  # and a good config passes quietly


# ---- the CLI: errors before anything starts ---------------------------------------------------

def chatforge(args: list[str], cwd: Path, env: dict[str, str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHATFORGE), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def assert_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and all(line.startswith("chatforge: error: ") for line in lines), lines
    for needle in needles:
        assert needle in proc.stderr


def test_cli_unknown_group_option(tmp_path: Path) -> None:
    proc = chatforge(["model=nosuch", f"run.dir={tmp_path / 'run'}"], tmp_path)
    assert_usage_error(proc, "model=nosuch", "gpt_125m")
    assert not (tmp_path / "run").exists()


def test_cli_bad_value_stops_before_any_process(tmp_path: Path) -> None:
    proc = chatforge(["parallel.tp=3", f"run.dir={tmp_path / 'run'}"], tmp_path)
    assert_usage_error(proc, "chatforge: error: parallel.tp=3: ")
    assert not (tmp_path / "run" / "logs").exists()
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


def test_cli_sweep_validates_every_point_first(tmp_path: Path) -> None:
    proc = chatforge(["-m", "parallel.tp=1,3", f"run.dir={tmp_path / 'run'}"], tmp_path)
    assert_usage_error(proc, "parallel.tp=3: ", "(sweep points 1)")
    assert not (tmp_path / "run").exists()  # point 0 is fine but did not run either


def test_cli_unknown_key(tmp_path: Path) -> None:
    assert_usage_error(chatforge(["train.stepz=5"], tmp_path), "train.stepz=5: ")


def test_cli_plan_starts_nothing(tmp_path: Path) -> None:
    proc = chatforge(["plan", "parallel=tp2", "cluster.procs_per_node=4",
                      f"run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "world=4 tp=2 pp=1 dp=2" in proc.stdout
    assert not (tmp_path / "run").exists()


# ---- the CLI: a real run against a stand-in trainer ----------------------------------------

FAKE_MAIN = """
import os, sys
print("fake trainer rank", os.environ["RANK"], "config", sys.argv[1], flush=True)
sys.exit(int(os.environ.get("FAKE_EXIT", "0")) if os.environ["RANK"] == "1" else 0)
"""


@pytest.fixture
def fake_trainer(tmp_path: Path) -> dict[str, str]:
    """PYTHONPATH with a `trainer` package whose __main__ is ours while the modules the launcher
    reads (trainer.stages, trainer.exitcodes) stay the real ones (the stand-in extends its
    __path__), so the launcher is tested on its own."""
    package = tmp_path / "fake" / "trainer"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"__path__.append({str(REPO / 'trainer')!r})\n")
    (package / "__main__.py").write_text(FAKE_MAIN)
    return {"PYTHONPATH": str(tmp_path / "fake")}


def test_cli_runs_ranks_and_writes_the_resolved_config(tmp_path: Path,
                                                       fake_trainer: dict[str, str]) -> None:
    proc = chatforge(["cluster.procs_per_node=2", "run.dir=run", "optim.lr=0.125"],
                     tmp_path, env=fake_trainer)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.run.dir == str(run) and saved.optim.lr == 0.125
    assert "hydra" not in saved
    assert f"fake trainer rank 0 config {run / 'config.yaml'}" in proc.stdout
    assert "fake trainer rank 1" not in proc.stdout
    assert "fake trainer rank 1" in (run / "logs" / "rank_1.log").read_text()
    assert not (tmp_path / "outputs").exists() and not (run / ".hydra").exists()


def test_cli_propagates_the_job_exit_code(tmp_path: Path, fake_trainer: dict[str, str]) -> None:
    proc = chatforge(["cluster.procs_per_node=2", "run.dir=run"], tmp_path,
                     env={**fake_trainer, "FAKE_EXIT": "7"})
    assert proc.returncode == 7
    assert "rank 1 failed with exit code 7" in proc.stderr


def test_cli_multirun_points_run_in_numbered_dirs(tmp_path: Path,
                                                  fake_trainer: dict[str, str]) -> None:
    proc = chatforge(["-m", "run.dir=sweep", "optim.lr=0.25,0.5"], tmp_path, env=fake_trainer)
    assert proc.returncode == 0, proc.stderr
    for num, lr in ((0, 0.25), (1, 0.5)):
        saved = OmegaConf.load(tmp_path / "sweep" / str(num) / "config.yaml")
        assert saved.run.dir == str(tmp_path / "sweep" / str(num)) and saved.optim.lr == lr
        assert (tmp_path / "sweep" / str(num) / "logs" / "rank_0.log").exists()


# ---- run_local --------------------------------------------------------------------------------

ENV_DUMP = ("import json, os; print(json.dumps({k: os.environ.get(k) for k in "
            "('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', "
            "'MASTER_PORT', 'OMP_NUM_THREADS', 'EXTRA')}))")


def _env_from_log(path: Path) -> dict[str, str]:
    line = [ln for ln in path.read_text().splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def test_run_local_sets_the_rank_env_and_writes_rank_logs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_local([sys.executable, "-c", ENV_DUMP], world_size=2, run_dir=tmp_path,
                     env_extra={"EXTRA": "x"}, threads=3)
    assert code == 0
    envs = [_env_from_log(tmp_path / "logs" / f"rank_{r}.log") for r in range(2)]
    for rank, env in enumerate(envs):
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
        assert (env["MASTER_ADDR"], env["OMP_NUM_THREADS"], env["EXTRA"]) == ("127.0.0.1", "3", "x")
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]
    assert 0 < int(envs[0]["MASTER_PORT"]) < 65536
    console = capsys.readouterr().out
    assert '"RANK": "0"' in console and '"RANK": "1"' not in console


FAIL_ONE = """
import os, sys, time
rank, pids = int(os.environ["RANK"]), sys.argv[1]
if rank == 0:
    open(os.path.join(pids, "rank0.pid"), "w").write(str(os.getpid()))
    time.sleep(60)
else:
    while not os.path.exists(os.path.join(pids, "rank0.pid")):
        time.sleep(0.01)
    print("last words of rank one", flush=True)
    sys.exit(3)
"""


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_run_local_failure_stops_the_others_and_names_the_rank(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.monotonic()
    code = run_local([sys.executable, "-c", FAIL_ONE, str(tmp_path)], world_size=2,
                     run_dir=tmp_path, env_extra={}, threads=1, grace_s=30.0)
    elapsed = time.monotonic() - start
    assert code == 3
    assert elapsed < 10.0  # SIGTERM did it: the 30 s grace before SIGKILL was not needed
    assert not _is_alive(int((tmp_path / "rank0.pid").read_text()))
    err = capsys.readouterr().err
    assert "rank 1 failed with exit code 3" in err and "last words of rank one" in err


def test_run_local_reports_a_rank_killed_by_a_signal(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    assert run_local(cmd, world_size=1, run_dir=tmp_path, env_extra={}, threads=1) == 128 + 9


LAUNCH_AND_WAIT = """
import sys
from pathlib import Path
from launcher.local import run_local
cmd = [sys.executable, "-c", "import os, sys, time; "
       "open(os.path.join(sys.argv[1], 'r%s.pid' % os.environ['RANK']), 'w')"
       ".write(str(os.getpid())); time.sleep(60)", sys.argv[1]]
sys.exit(run_local(cmd, 2, Path(sys.argv[1]), {}, 1, grace_s=30.0))
"""


def test_sigint_to_the_launcher_is_forwarded_to_every_rank(tmp_path: Path) -> None:
    # start_new_session: the test's own process group must not see this SIGINT.
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCH_AND_WAIT, str(tmp_path)],
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    pid_files = [tmp_path / f"r{rank}.pid" for rank in range(2)]
    deadline = time.monotonic() + 30
    while not all(f.exists() and f.read_text() for f in pid_files):
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.05)
    pids = [int(f.read_text()) for f in pid_files]
    launcher.send_signal(signal.SIGINT)
    _, err = launcher.communicate(timeout=15)  # well inside the 30 s grace: SIGINT did it
    assert launcher.returncode == 128 + signal.SIGINT
    assert "stopped by SIGINT" in err
    assert not any(_is_alive(pid) for pid in pids)


def test_parent_death_signal_stops_a_child_when_its_parent_dies() -> None:
    """launcher.zygote.parent_death_signal, the preexec_fn part that local ranks started by
    exec (and the zygote itself) use: a child of a process that exits gets SIGTERM."""
    script = ("import subprocess, sys; from launcher.zygote import parent_death_signal; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
              "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=parent_death_signal()); "
              "print(p.pid, flush=True)")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.split()[0])

    def alive() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 20
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive():
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the child outlived its parent")
