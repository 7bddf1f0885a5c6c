"""`.ci/run` ends with `tests: N passed, M failed[, K skipped]`, parsed from pytest's summary."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.mark.parametrize(
    ("output", "line"),
    [
        ("....\n327 passed, 2 skipped in 38.12s\n", "tests: 327 passed, 0 failed, 2 skipped"),
        ("F.\n1 failed, 326 passed in 40.01s (0:00:40)\n", "tests: 326 passed, 1 failed"),
        (
            "==== 1 failed, 2 passed, 3 errors, 1 skipped, 4 warnings in 0.12s ====\n",
            "tests: 2 passed, 4 failed, 1 skipped",
        ),
        ("2 passed, 1 error in 1.5s\n", "tests: 2 passed, 1 failed"),
        ("1 error in 0.50s\n", "tests: 0 passed, 1 failed"),
        ("3 passed, 2 xpassed, 1 xfailed, 2 deselected in 0.5s\n", "tests: 3 passed, 0 failed"),
        ("no tests ran in 0.01s\n", "tests: 0 passed, 0 failed"),
        ("INTERNALERROR> boom\n", "tests: 0 passed, 0 failed"),
        (
            "\x1b[32m==== \x1b[1m5 passed\x1b[0m, \x1b[33m1 warning\x1b[0m\x1b[32m in 1.00s ====\n",
            "tests: 5 passed, 0 failed",
        ),
        # A test's own output that looks like a summary is not the summary: the last line is.
        ("9 passed in 1s\nFAILED t\n12 failed, 88 passed in 1.2s\n", "tests: 88 passed, 12 failed"),
    ],
)
def test_the_count_line(tmp_path, output, line):
    log = tmp_path / "pytest.out"
    log.write_text(output)
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "--count-line", str(log)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.splitlines() == [line]
