"""The README stays true: every setting, every SSE event, the CI command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented():
    source = (ROOT / "server" / "settings.py").read_text()
    names = set(re.findall(r'"(CHINWAG_[A-Z0-9_]+)"', source))
    assert len(names) > 20
    missing = sorted(n for n in names if f"`{n}`" not in README)
    assert missing == []


def test_every_sse_event_is_documented():
    from server.dialects import CHAT, V1

    source = "".join(p.read_text() for p in (ROOT / "server").rglob("*.py"))
    published = set(re.findall(r'(?:publish|_publish_final|_publish)\(\s*"([a-z-]+)"', source))
    published |= {*CHAT.events, *V1.events}
    controls = set(re.findall(r'\("(observer|history-start|history-end|lagged)"', source))
    assert {"chunk", "error", "done", "token", "usage"} <= published
    for name in published | controls:
        assert f"`{name}`" in README, name


def test_ci_runs_the_readme_test_command():
    command = re.search(r"```sh\n(python3 -m venv .venv && .*pytest)\n```", README)
    assert command is not None
    assert command.group(1) in (ROOT / ".ci" / "run").read_text()
