"""parallel.layers' grad-free linears and TP=1 region skips change no bit, and its TP=1
training linears change nothing beyond fp32 rounding (one rank; the TP>1 layouts, where they
stand aside, are pinned by test_equivalence.py)."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_fast_paths_match_megatrons_bit_for_bit() -> None:
    proc = subprocess.run([sys.executable, "-m", "tests.dist.fast_paths_worker"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-3000:] + proc.stderr[-3000:]
