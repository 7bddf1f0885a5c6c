"""The web console (SPEC §10) in a real browser: Debian's Chromium driven by
Playwright (sync API, headless), against a real ``chinwag serve`` on loopback.

Each test does what a person would do and asserts what they would see: the
words on the page, text growing while an answer streams, a balance changing.
Every page's console must stay free of errors (Chromium's own "Failed to load
resource" line for an API call that answered 4xx, which the page then shows in
words, is the one report that is not the page's fault) and no script error
may escape.

The simulated model is paced (``CHINWAG_SIM_TOKENS_PER_S``) so answers
visibly grow; a test that needs a slower stream or a broken connection adds
``X-Sim-Tokens-Per-S`` / ``X-Test-Scenario`` to the console's stream requests
from outside the page (``CHINWAG_TEST_SCENARIOS=1``, SPEC §8).

Screenshots of each view are taken by these tests; with ``UPDATE_SCREENSHOTS=1``
they are written to docs/screenshots/ (the README shows them), otherwise to a
temporary directory, so a plain test run leaves the tree as it was.

Without Chromium the whole module is skipped with one reason line; under
``CI=true`` that is a failure instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NO_CHROMIUM = "Chromium not installed: apt-get install -y chromium"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


if not Path(CHROMIUM).exists():
    if _in_ci():
        pytest.fail(f"{NO_CHROMIUM} (CI=true: the browser tests must run)", pytrace=False)
    pytest.skip(NO_CHROMIUM, allow_module_level=True)

from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright  # noqa: E402

PASSWORD = "console-password-1"
TOKENS_PER_S = 20
ANSWER_TOKENS = 100
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
HOSTILE_TITLE = '<img src=x onerror="window.__pwned=1">Q3 & <b>plans</b>'
HOSTILE_MESSAGE = "<script>window.__pwned=2</script><i>hi</i> & <a href=javascript:alert(1)>x</a>"

expect.set_options(timeout=10_000)


# -- the server ---------------------------------------------------------------


@dataclass
class Server:
    url: str
    env: dict[str, str]
    log: Path
    ids: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "server.cli", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout

    def token(self, username: str) -> str:
        r = httpx.post(
            f"{self.url}/api/auth/login", json={"username": username, "password": PASSWORD}
        )
        r.raise_for_status()
        return str(r.json()["accessToken"])

    def api(self, username: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.token(username)}"},
            timeout=30,
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("console")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    env.update(
        {
            "CHINWAG_DB": str(tmp / "console.db"),
            "CHINWAG_HOST": "127.0.0.1",
            "CHINWAG_PORT": "0",
            "CHINWAG_SIM_TTFT_MS": "100",
            "CHINWAG_SIM_TOKENS_PER_S": str(TOKENS_PER_S),
            "CHINWAG_SIM_ANSWER_TOKENS": str(ANSWER_TOKENS),
            "CHINWAG_RATE_LIMIT": "100000",
            "CHINWAG_TEST_SCENARIOS": "1",
            "CHINWAG_SSE_HEARTBEAT_MS": "2000",
        }
    )
    srv = Server(url="", env=env, log=tmp / "server.log")
    for name, role, credits in (
        ("alice", "enduser", 100_000),
        ("bob", "enduser", 0),
        ("carol", "enduser", 500),
        ("mallory", "enduser", 100_000),
        ("sam", "supervisor", 0),
        ("ada", "admin", 0),
    ):
        out = srv.cli("user", "add", name, "--password", PASSWORD, "--role", role)
        srv.ids[name] = out.split("(id ")[1].split(")")[0]
        if credits:
            srv.cli("credits", "allocate", name, str(credits))
    stdout = tmp / "stdout.txt"
    with stdout.open("wb") as out, srv.log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 30
        while "listening on " not in stdout.read_text():
            assert proc.poll() is None, srv.log.read_text()
            assert time.monotonic() < deadline, "chinwag serve did not start"
            time.sleep(0.05)
        srv.url = stdout.read_text().split("listening on ", 1)[1].split()[0]
        yield srv
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -9
    errors = [
        line
        for line in srv.log.read_text().splitlines()
        if '"level": "error"' in line or line.startswith("Traceback")
    ]
    assert errors == [] and code == 0, (code, errors[:5])


# -- the browser --------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Playwright's sync API runs its own asyncio loop; trio-asyncio (imported
    # by the server for Bedrock) installs a policy whose loops run inside Trio.
    # Playwright gets a plain asyncio loop; the policy is put back afterwards.
    policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
            try:
                yield b
            finally:
                b.close()
    finally:
        asyncio.set_event_loop_policy(policy)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("UPDATE_SCREENSHOTS", "").strip() in ("1", "true", "yes"):
        out = ROOT / "docs" / "screenshots"
        out.mkdir(parents=True, exist_ok=True)
        return out
    return tmp_path_factory.mktemp("screenshots")


@dataclass
class Pages:
    """Opens pages in fresh contexts (fresh sessionStorage) and watches their consoles."""

    browser: Browser
    url: str
    problems: list[str] = field(default_factory=list)
    contexts: list[BrowserContext] = field(default_factory=list)
    #: Console reports a test provokes on purpose (a cut connection), and those seen.
    allowed: tuple[str, ...] = ()
    seen: list[str] = field(default_factory=list)

    def open(
        self, viewport: dict[str, int] = DESKTOP, stream_headers: dict[str, str] | None = None
    ) -> Page:
        context = self.browser.new_context(viewport=viewport, base_url=self.url)
        self.contexts.append(context)
        if stream_headers:
            context.add_init_script(with_stream_headers(stream_headers))
        page = context.new_page()
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.goto("/")
        return page

    def _console(self, message: Any) -> None:
        if message.type not in ("error", "warning"):
            return
        where = message.location.get("url", "")
        if message.text.startswith("Failed to load resource: the server responded") and (
            where.startswith(f"{self.url}/api/")
        ):
            return  # an API answer of 4xx: the page handles it and says so in words
        if any(text in message.text for text in self.allowed):
            self.seen.append(message.text)
            return
        self.problems.append(f"console {message.type}: {message.text} ({where})")


@pytest.fixture
def pages(browser: Browser, server: Server) -> Iterator[Pages]:
    opened = Pages(browser, server.url)
    try:
        yield opened
    finally:
        for context in opened.contexts:
            context.close()
    assert opened.problems == []


def with_stream_headers(headers: dict[str, str]) -> str:
    """An init script adding test headers to the page's POST …/stream requests."""
    return (
        "(() => {"
        f"  const extra = {json.dumps(headers)};"
        "  const original = window.fetch;"
        "  window.fetch = (input, init = {}) => {"
        "    const url = String(input instanceof Request ? input.url : input);"
        "    if (/\\/stream(\\?|$)/.test(url) && (init.method || 'GET') === 'POST') {"
        "      init = { ...init, headers: { ...(init.headers || {}), ...extra } };"
        "    }"
        "    return original(input, init);"
        "  };"
        "})();"
    )


# -- what a person does -------------------------------------------------------


def sign_in(page: Page, username: str, password: str = PASSWORD) -> None:
    """With the keyboard only: type, Tab, type, Enter."""
    page.locator("#username").focus()
    page.keyboard.type(username)
    page.keyboard.press("Tab")
    page.keyboard.type(password)
    page.keyboard.press("Enter")
    if password == PASSWORD:
        expect(page.locator("#whoami")).to_contain_text(username)


def new_chat(page: Page, title: str) -> None:
    page.goto("/#/chat")
    page.click("#new-chat")
    expect(page.locator("#chat-title")).to_have_text("New chat")
    page.click("#rename")
    page.fill("#rename-title", title)
    page.press("#rename-title", "Enter")
    expect(page.locator("#chat-title")).to_have_text(title)
    expect(page.locator("#sessions a[aria-current=page] .title")).to_have_text(title)


def say(page: Page, text: str) -> None:
    page.fill("#message", text)
    page.press("#message", "Enter")


def answer_text(page: Page) -> str:
    return page.locator("#messages .msg.assistant .content").last.inner_text()


def wait_for(predicate: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        time.sleep(0.05)


def words(page: Page, min_words: int) -> None:
    wait_for(lambda: len(answer_text(page).split()) >= min_words, what=f"{min_words} words")


def balance_of(server: Server, username: str) -> int:
    with server.api("ada") as api:
        r = api.get("/api/credits/balance", params={"userId": server.ids[username]})
        return int(r.json()["available"])


# -- the tests ----------------------------------------------------------------


def test_sign_in_shows_a_wrong_password_then_signs_in_and_out(pages, server):
    page = pages.open()
    expect(page.locator("h1")).to_have_text("Sign in to chinwag")
    sign_in(page, "alice", "not-the-password")
    expect(page.locator("#signin-error")).to_have_text("Wrong username or password.")
    expect(page.locator("#whoami")).to_have_count(0)

    page.fill("#password", PASSWORD)
    page.press("#password", "Enter")
    expect(page.locator("#whoami")).to_have_text("alice (enduser)")
    expect(page.locator("#balance")).to_have_text(
        f"Balance: {balance_of(server, 'alice'):,} credits"
    )
    # An end user sees the chat only.
    expect(page.locator("#nav a")).to_have_text(["Chat"])
    token = page.evaluate("sessionStorage.getItem('chinwag.console')")
    assert token and "accessToken" not in page.url and json.loads(token)["token"] not in page.url

    # Reloading the tab keeps the sign-in (sessionStorage); signing out forgets it.
    page.reload()
    expect(page.locator("#whoami")).to_have_text("alice (enduser)")
    page.click("#signout")
    expect(page.locator("#signin-error")).to_have_text("You are signed out.")
    assert page.evaluate("sessionStorage.length") == 0


def test_an_answer_streams_in_as_it_is_written_then_finishes(pages, server, shots):
    page = pages.open()
    sign_in(page, "alice")
    new_chat(page, "Trip to the coast")
    before = balance_of(server, "alice")
    say(page, "What should I pack for a weekend by the sea?")

    user = page.locator("#messages .msg.user").last
    expect(user.locator(".content")).to_have_text("What should I pack for a weekend by the sea?")
    expect(page.locator("#chat-status")).to_have_text("Receiving the answer…")
    expect(page.locator("#stop")).to_be_enabled()
    expect(page.locator("#send")).to_be_disabled()
    # The text grows on screen while the answer is still being written.
    seen = []
    while len(seen) < 4:
        assert page.locator("#chat-status").get_attribute("data-state") == "streaming"
        n = len(answer_text(page).split())
        if n and (not seen or n > seen[-1]):
            seen.append(n)
        time.sleep(0.15)
    assert seen == sorted(seen) and seen[-1] < ANSWER_TOKENS

    expect(page.locator("#chat-status")).to_have_attribute("data-state", "done")
    after = balance_of(server, "alice")
    assert after < before
    expect(page.locator("#chat-status")).to_have_text(f"Done. Balance: {after:,} credits.")
    expect(page.locator("#balance")).to_have_text(f"Balance: {after:,} credits")
    assistant = page.locator("#messages .msg.assistant").last
    expect(assistant.locator(".meta")).to_contain_text(f"{before - after} credit")
    assert len(answer_text(page).split()) >= seen[-1]
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()

    # What the page showed is what the server stored.
    shown = answer_text(page)
    page.reload()
    expect(page.locator("#messages .msg.assistant .content").last).to_have_text(shown)

    say(page, "And if it rains?")
    expect(page.locator("#chat-status")).to_have_attribute("data-state", "done")
    page.locator("#message").focus()
    page.screenshot(path=str(shots / "chat.png"))

    # A second chat: rename it, then delete it.
    new_chat(page, "Scratch")
    page.click("#rename")
    page.fill("#rename-title", "Scratch, renamed")
    page.press("#rename-title", "Enter")
    expect(page.locator("#chat-title")).to_have_text("Scratch, renamed")
    page.click("#delete")
    expect(page.locator(".conv-head .confirm")).to_have_text("Delete this chat and its messages?")
    page.click("#confirm-delete")
    expect(page.locator("#chat-title")).to_have_text("Pick a chat, or start a new one")
    expect(page.locator("#sessions .title", has_text="Scratch")).to_have_count(0)
    expect(page.locator("#sessions .title").first).to_have_text("Trip to the coast")


def test_stop_ends_an_answer_half_way_and_keeps_what_was_written(pages, server):
    page = pages.open(stream_headers={"X-Sim-Tokens-Per-S": "10"})
    sign_in(page, "alice")
    new_chat(page, "Long story")
    say(page, "Tell me a long story about lighthouses.")
    words(page, 8)
    page.click("#stop")

    expect(page.locator("#chat-status")).to_have_attribute("data-state", "stopped")
    balance = balance_of(server, "alice")
    expect(page.locator("#chat-status")).to_have_text(
        f"Stopped. The answer so far is kept. Balance: {balance:,} credits."
    )
    stopped = answer_text(page)
    assert 8 <= len(stopped.split()) < ANSWER_TOKENS
    time.sleep(1)
    assert answer_text(page) == stopped  # nothing more arrives
    expect(page.locator("#messages .msg.assistant .meta").last).to_contain_text("tokens")

    # Coming back to the chat shows the stored, cut-short answer.
    page.goto("/#/chat")
    page.click("#sessions a:has-text('Long story')")
    last = page.locator("#messages .msg.assistant").last
    expect(last.locator(".meta")).to_contain_text(
        "Cut short: the connection ended before the answer did."
    )
    stored = last.locator(".content").inner_text()
    assert stored.startswith(stopped) and len(stored.split()) < ANSWER_TOKENS


def test_a_supervisor_joins_late_sees_the_history_then_live_text_and_stops_it(pages, server, shots):
    client = pages.open(stream_headers={"X-Sim-Tokens-Per-S": "8"})
    sign_in(client, "alice")
    new_chat(client, "Harbour questions")

    supervisor = pages.open()
    sign_in(supervisor, "sam")
    expect(supervisor.locator("#nav a")).to_have_text(["Chat", "Live streams", "Users"])
    supervisor.click("#nav a:has-text('Live streams')")
    expect(supervisor.locator("#live-empty")).to_be_visible()

    say(client, "How deep is the harbour at low tide?")
    words(client, 3)
    # The list updates by itself: the new stream appears without a reload.
    row = supervisor.locator("#live-streams tbody tr", has_text="Harbour questions")
    expect(row).to_be_visible()
    expect(row.locator("td.user")).to_have_text("alice")
    expect(row).to_contain_text("amazon.nova-micro-v1:0")
    supervisor.screenshot(path=str(shots / "live.png"))
    words(client, 12)  # join late: a good part of the answer is already written
    already = len(answer_text(client).split())
    row.get_by_role("link", name="Watch").click()

    expect(supervisor.locator("#watch-title")).to_have_text("Watching: Harbour questions")
    expect(supervisor.locator("#watch-messages .msg.user .content")).to_have_text(
        "How deep is the harbour at low tide?"
    )
    expect(supervisor.locator("#watch-status")).to_have_text(
        "Live: new words appear as the model writes them."
    )
    history = supervisor.locator("#watch-answer .from-history").inner_text()
    assert len(history.split()) >= already  # the history at once
    assert answer_text(client).startswith(history)
    live = supervisor.locator("#watch-answer .from-live")
    wait_for(lambda: len(live.inner_text().split()) >= 4, what="live words")
    expect(supervisor.locator("#watch-counts")).to_contain_text("new since you joined")
    supervisor.screenshot(path=str(shots / "watch.png"))

    supervisor.fill("#stop-reason", "Off-topic")
    supervisor.click("#stop-stream")
    expect(supervisor.locator("#stop-note")).to_have_text(
        "Stopped. The user was told the answer was stopped by a supervisor."
    )
    expect(supervisor.locator("#watch-status")).to_have_text(
        "Ended. This answer was stopped by a supervisor."
    )
    # The client's page says so too, and the text stops growing.
    expect(client.locator("#chat-status")).to_have_attribute("data-state", "cancelled")
    expect(client.locator("#chat-status")).to_contain_text(
        "This answer was stopped by a supervisor."
    )
    client_text = answer_text(client)
    watched = supervisor.locator("#watch-answer .content").inner_text()
    assert client_text == watched and len(client_text.split()) < ANSWER_TOKENS

    # The reason is kept with the message, for staff.
    supervisor.goto(f"/#/users/{server.ids['alice']}")
    supervisor.click("#user-sessions a:has-text('Harbour questions')")
    expect(supervisor.locator("#user-messages .msg.assistant")).to_contain_text(
        "Reason given for stopping: Off-topic"
    )


def test_an_admin_allocates_credits_once_and_sees_balance_and_chart_change(pages, server, shots):
    # Some history for carol: charges from a few answers, and a second allocation.
    with server.api("carol") as api:
        sid = api.post("/api/chat/sessions", json={"title": "budget"}).json()["sessionId"]
        for i in range(4):
            r = api.post(
                f"/api/chat/sessions/{sid}/stream",
                json={"message": f"question {i}", "maxTokens": 40},
                headers={"X-Sim-Tokens-Per-S": "0", "X-Sim-Ttft-Ms": "0"},
            )
            assert r.status_code == 200 and "event: done" in r.text
            if i == 1:
                server.cli("credits", "allocate", "carol", "300")
    before = balance_of(server, "carol")

    page = pages.open()
    sign_in(page, "ada")
    page.click("#nav a:has-text('Credits')")
    page.fill("#balance-q", "carol")
    page.press("#balance-q", "Enter")
    row = page.locator("#balances tbody tr", has_text="carol")
    expect(row.locator("td.balance")).to_have_text(f"{before:,}")
    row.get_by_role("link", name="carol").click()

    expect(page.locator("#credit-user-title")).to_have_text("Credits of carol")
    expect(page.locator("#stat-balance")).to_have_text(f"{before:,}")
    chart = page.locator("#usage-chart")
    expect(chart.locator("svg circle")).to_have_count(6)  # 2 allocations, 4 charges
    expect(chart.locator("figcaption")).to_contain_text(f"now {before:,} credits")

    page.fill("#amount", "250")
    page.fill("#alloc-reason", "Quarterly top-up")
    page.dblclick("#allocate")  # a double click allocates once
    expect(page.locator("#allocate-note")).to_have_text(
        f"Allocated 250 credits. Balance now {before + 250:,} credits."
    )
    expect(page.locator("#stat-balance")).to_have_text(f"{before + 250:,}")
    expect(chart.locator("svg circle")).to_have_count(7)
    expect(chart.locator("figcaption")).to_contain_text(f"now {before + 250:,} credits")
    expect(page.locator("#entries-table tbody tr").first).to_contain_text("Quarterly top-up")
    expect(row.locator("td.balance")).to_have_text(f"{before + 250:,}")
    page.wait_for_timeout(500)
    assert balance_of(server, "carol") == before + 250
    with server.api("ada") as api:
        usage = api.get("/api/credits/usage", params={"userId": server.ids["carol"]}).json()
        assert [e["reason"] for e in usage["entries"]].count("Quarterly top-up") == 1

    # Adding a user, then the same name again.
    page.fill("#new-username", "dave")
    page.fill("#new-password", "dave-password")
    page.select_option("#new-role", "supervisor")
    page.click("#create-user")
    expect(page.locator("#create-note")).to_have_text("Added dave (supervisor).")
    page.fill("#new-username", "dave")
    page.fill("#new-password", "dave-password")
    page.click("#create-user")
    expect(page.locator("#create-note")).to_have_text("A user with this username already exists.")
    page.fill("#new-username", "")
    page.locator("#amount").focus()
    page.screenshot(path=str(shots / "credits.png"), full_page=True)


def test_html_and_script_in_a_title_and_a_message_show_as_literal_text(pages, server):
    client = pages.open(stream_headers={"X-Sim-Tokens-Per-S": "8"})
    sign_in(client, "mallory")
    new_chat(client, HOSTILE_TITLE)
    say(client, HOSTILE_MESSAGE)
    expect(client.locator("#messages .msg.user .content").last).to_have_text(HOSTILE_MESSAGE)
    expect(client.locator("#sessions a[aria-current=page] .title")).to_have_text(HOSTILE_TITLE)

    supervisor = pages.open()
    sign_in(supervisor, "sam")
    supervisor.goto("/#/live")
    row = supervisor.locator("#live-streams tbody tr", has_text="mallory")
    expect(row.locator("td.title")).to_have_text(HOSTILE_TITLE)
    row.get_by_role("link", name="Watch").click()
    expect(supervisor.locator("#watch-title")).to_have_text(f"Watching: {HOSTILE_TITLE}")
    expect(supervisor.locator("#watch-messages .msg.user .content")).to_have_text(HOSTILE_MESSAGE)
    supervisor.click("#stop-stream")
    expect(client.locator("#chat-status")).to_have_attribute("data-state", "cancelled")

    supervisor.goto("/#/users")
    supervisor.fill("#user-q", "mallory")
    supervisor.press("#user-q", "Enter")
    supervisor.click("#user-results a:has-text('mallory')")
    expect(supervisor.locator("#user-sessions .title").first).to_have_text(HOSTILE_TITLE)
    supervisor.locator("#user-sessions a").first.click()
    expect(supervisor.locator("#users-title")).to_have_text(HOSTILE_TITLE)
    expect(supervisor.locator("#user-messages .msg.user .content")).to_have_text(HOSTILE_MESSAGE)

    client.reload()
    expect(client.locator("#chat-title")).to_have_text(HOSTILE_TITLE)
    expect(client.locator("#messages .msg.user .content")).to_have_text(HOSTILE_MESSAGE)
    for page in (client, supervisor):
        # Shown as text: none of it became an element, none of it ran.
        assert (
            page.locator("main img, main script, main b, main i, main a[href^=javascript]").count()
            == 0
        )
        assert page.evaluate("window.__pwned") is None


def test_errors_are_said_in_words(pages, server):
    # 402: no credits. The message is not lost: it goes back in the box.
    page = pages.open()
    sign_in(page, "bob")
    new_chat(page, "Broke")
    say(page, "Hello?")
    expect(page.locator("#chat-status")).to_have_attribute("data-state", "failed")
    status = page.locator("#chat-status").inner_text()
    assert status.startswith("Not enough credits for this answer.")
    assert "0 available" in status and status.endswith("Ask an admin to add credits.")
    expect(page.locator("#messages .msg.user .meta").last).to_have_text("Not sent.")
    expect(page.locator("#message")).to_have_value("Hello?")

    # 429 with Retry-After.
    page.route(
        "**/api/chat/sessions/*/stream",
        lambda route: route.fulfill(
            status=429,
            headers={"Retry-After": "7", "Content-Type": "application/json"},
            body=json.dumps({"message": "Rate limit exceeded.", "errorCode": "RATE_LIMITED"}),
        ),
    )
    page.click("#send")
    expect(page.locator("#chat-status")).to_have_text("Too many requests. Try again in 7 seconds.")

    # A role too low for a view.
    page.goto("/#/credits")
    expect(page.locator("main")).to_contain_text("This view is for supervisors and admins.")


def test_a_dropped_stream_is_resumed_with_last_event_id(pages, server):
    # Chromium reports the cut connection on the console: provoked here on purpose.
    pages.allowed = ("net::ERR_INCOMPLETE_CHUNKED_ENCODING",)
    page = pages.open(
        stream_headers={"X-Test-Scenario": "reset_midway", "X-Sim-Tokens-Per-S": "40"}
    )
    resumes: list[dict[str, str]] = []
    page.on(
        "request",
        lambda r: (
            resumes.append({"url": r.url, **r.headers})
            if r.method == "GET" and "/stream?" in r.url
            else None
        ),
    )
    sign_in(page, "alice")
    new_chat(page, "Flaky network")
    say(page, "Keep going even if the line drops")
    # The connection is cut half-way; the page resumes after the last event it
    # has. With the default grace of 0 the server ended the stream at the cut,
    # so the resume replays its buffered end: the page says what happened.
    expect(page.locator("#chat-status")).to_have_attribute("data-state", "cut")
    expect(page.locator("#chat-status")).to_contain_text(
        "The connection dropped, so the answer was cut short."
    )
    assert len(resumes) == 1
    assert "streamingSessionId=stream-" in resumes[0]["url"]
    # The server cut right after event ANSWER_TOKENS // 2 (tests/e2e/test_client_controls.py
    # proves the bytes up to it go out); Chromium may drop the last read that arrives
    # together with the broken connection, so the page resumes from just before it.
    assert ANSWER_TOKENS // 4 <= int(resumes[0]["last-event-id"]) <= ANSWER_TOKENS // 2
    assert "token=" not in resumes[0]["url"] and "authorization" in resumes[0]
    assert len(pages.seen) == 1  # the connection really broke, once
    shown = answer_text(page)
    assert len(shown.split()) >= ANSWER_TOKENS // 2
    page.reload()
    expect(page.locator("#messages .msg.assistant .content").last).to_have_text(shown)


def test_phone_sized_screen(pages, server, shots):
    with server.api("alice") as api:
        api.post(
            "/api/chat/sessions",
            json={"title": "On the bus", "initialMessage": "Which stop is closest to the pier?"},
        )
    page = pages.open(viewport=PHONE, stream_headers={"X-Sim-Tokens-Per-S": "100"})
    sign_in(page, "alice")
    # The list of chats, full width; a chat opens on its own with a way back.
    expect(page.locator("#sessions")).to_be_visible()
    page.locator("#sessions a", has_text="On the bus").click()
    expect(page.locator("#sessions")).to_be_hidden()
    expect(page.locator("#chat-title")).to_have_text("On the bus")
    expect(page.locator("#messages .msg.user .content")).to_have_text(
        "Which stop is closest to the pier?"
    )
    expect(page.locator(".conv-head .back")).to_be_visible()
    say(page, "And from there to the lighthouse?")
    expect(page.locator("#chat-status")).to_have_attribute("data-state", "done")
    expect(page.locator("#message")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.screenshot(path=str(shots / "chat-phone.png"))
    page.click(".conv-head .back")
    expect(page.locator("#sessions")).to_be_visible()
