"""The package's edges: its public names, and arrows that point one way."""

from __future__ import annotations

import subprocess
import sys

import observation


def test_public_names() -> None:
    public = {name for name in vars(observation) if not name.startswith("_")}
    assert {
        "ObservationManager",
        "Stream",
        "Event",
        "Batch",
        "Reader",
        "ObservationStatistics",
        "StreamExists",
    } <= public


def test_observation_imports_neither_server_nor_ledger_nor_http() -> None:
    code = (
        "import sys, observation; "
        "names = ('server', 'ledger', 'quart', 'hypercorn', 'httpx'); "
        "bad = [m for m in names if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
