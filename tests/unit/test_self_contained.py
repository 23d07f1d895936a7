"""The repository is self-contained: no file refers to a directory beside the clone.

A user's clone, a fork's CI or a packager has nothing next to the repository, so a test, doc,
tool or CI script that reads a `shared` directory next to the clone (or builds that path)
breaks for them while passing on the development machine. The forbidden strings are built
by concatenation so that this file does not match itself.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.conftest import DATA, REPO

SIBLING = "shared"
FORBIDDEN = [
    re.compile(re.escape(".." + "/" + SIBLING)),                 # dot-dot slash shared
    re.compile(r"\bparents?\b[^\n]{0,20}/\s*[\"']" + SIBLING + r"[\"']"),  # REPO.parent / the name
    re.compile(r"(?<![\w/])" + SIBLING + "/" + "data"),            # the name slash data, relative
]
# Never part of the project: local environments and outputs (.gitignore'd too).
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "runs", "outputs", "multirun",
             "wandb"}


def sibling_references(text: str) -> list[str]:
    """Each line of `text` that names a directory beside the repository."""
    return [line.strip() for line in text.splitlines() if any(p.search(line) for p in FORBIDDEN)]


def project_files(root: Path) -> list[Path]:
    """Tracked and new (not ignored) files of a git checkout; every file outside the skipped
    directories when there is no git (an unpacked source archive)."""
    if (root / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=root, capture_output=True, check=True)
        names = out.stdout.decode().split("\0")
        return [root / name for name in names if name and (root / name).is_file()]
    files = []
    for here, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        files += [Path(here) / n for n in names]
    return files


def test_no_file_refers_to_a_directory_beside_the_repository() -> None:
    files = project_files(REPO)
    assert REPO / "tests" / "conftest.py" in files and DATA / "tinyshakespeare.txt" in files
    found = {str(f.relative_to(REPO)): hits for f in files
             if (hits := sibling_references(f.read_bytes().decode("utf-8", errors="replace")))}
    assert not found, ("files refer to a directory beside the repository (a clone has none; "
                       f"put what they need under tests/data/ or docs/): {found}")


def test_the_check_catches_each_form() -> None:
    bad = ["DATA = REPO.parent / '" + SIBLING + "' / 'data'",
           "SHAKESPEARE = Path(__file__).parents[2].parent / \"" + SIBLING + "\" / \"data\"",
           "see .." + "/" + SIBLING + "/notes/slurm-dev-cluster.md",
           "cp ../.." + "/" + SIBLING + "/x .",
           "python -m tools.tokenizer --input " + SIBLING + "/" + "data/tinyshakespeare.txt"]
    good = ["run.dir=/shared/runs/1p3b", "the shared 1,800-line slice", "shared_data(tmp_path)",
            "DATA = REPO / 'tests' / 'data'", "a shared/exclusive node"]
    assert sibling_references("\n".join(bad)) == [line.strip() for line in bad]
    assert sibling_references("\n".join(good)) == []


def test_the_data_sets_are_in_the_repository_with_their_licences() -> None:
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for name in ["tinyshakespeare.txt", "hh_rlhf_harmless.jsonl", "alpaca_seed_tasks.jsonl"]:
        assert (DATA / name).stat().st_size > 100_000, name
        assert f"`{name}`" in readme, f"tests/data/README.md does not describe {name}"
    for licence in ["LICENSE.hh-rlhf", "LICENSE.alpaca-seed-tasks"]:
        assert (DATA / licence).is_file() and f"`{licence}`" in readme
