"""The import layers (DESIGN.md "Layers point down only"): the import-linter contracts in
pyproject.toml hold for the code as it is, and each of them fails when the arrow it guards
is broken (shown on a copy of the packages with one bad module added)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("tools", "launcher", "trainer", "parallel", "chatforge_config")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    # import-linter puts the working directory first on sys.path, so `root`'s packages are
    # the ones analysed (not the installed ones); --no-cache: nothing written into the repo.
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True,
                          text=True, timeout=120)


def test_the_import_contracts_hold() -> None:
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 4 kept, 0 broken." in proc.stdout, proc.stdout


def test_the_launcher_and_trainer_chat_leave_torch_out() -> None:
    """The one import the torch-free contract ignores (launcher.cli -> trainer.chat, for
    `chatforge chat`'s argument check) stays torch-free at run time too."""
    code = ("import sys, launcher.cli, launcher.slurm, launcher.recipe, trainer.chat, chatforge_config.trainer\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# A module added to a copy of the packages -> the contract whose name the failure must show.
BREAKS = {
    "upward import": ("parallel/_probe.py", "import trainer.loop\n", "layers point down"),
    "schema imports ours": ("chatforge_config/_probe.py", "import launcher.errors\n", "layers point down"),
    "torch in the launcher": ("launcher/_probe.py", "import torch\n", "import neither torch nor megatron"),
    "torch through the trainer": ("launcher/_probe.py", "import trainer.loop\n",
                                  "import neither torch nor megatron"),
    "megatron outside parallel": ("trainer/_probe.py", "from megatron.core import tensor_parallel\n",
                                  "only package that imports megatron"),
    "a cycle": ("launcher/_probe.py", "import launcher.cli\n", "no import cycles"),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_each_contract_fails_when_broken(tmp_path: Path, case: str) -> None:
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    path, source, contract = BREAKS[case]
    if case == "a cycle":  # cli imports the probe, the probe imports cli
        cli = tmp_path / "launcher" / "cli.py"
        cli.write_text(cli.read_text().replace("from launcher.local import run_local\n",
                                               "from launcher.local import run_local\nimport launcher._probe\n", 1))
    assert lint_imports(tmp_path).returncode == 0  # the copy holds until the probe comes
    (tmp_path / path).write_text(source)
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0, proc.stdout
    broken = proc.stdout[proc.stdout.index("Broken contracts"):]
    assert contract in broken and "_probe" in broken, broken
