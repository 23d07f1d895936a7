"""A hung test fails with the stack of where it hangs (pytest-timeout, pyproject's `timeout`)
instead of running until CI's own limit ends the whole suite without a word."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest


def test_the_suite_has_a_per_test_timeout(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    assert float(pytestconfig.getini("timeout")) == 600


def test_a_hung_test_fails_with_its_traceback_and_the_session_goes_on(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\ntimeout = 2\n")
    (tmp_path / "test_hang.py").write_text(
        "import time\n\n"
        "def wait_forever():\n    time.sleep(120)\n\n"
        "def test_hangs():\n    wait_forever()\n\n"
        "def test_after():\n    assert True\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 50
    assert proc.returncode == 1, proc.stdout
    assert "Failed: Timeout (>2.0s)" in proc.stdout, proc.stdout
    assert ">       time.sleep(120)" in proc.stdout  # the traceback shows where it hung
    assert "test_hang.py:4: Failed" in proc.stdout
    assert "1 failed, 1 passed" in proc.stdout
