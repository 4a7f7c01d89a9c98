"""The web console in a real browser (Debian's chromium, driven by Playwright) against a
system of real processes: nats-server, coordinator, orchestrator, a gateway with API keys,
and agents. What a person sees: runs arriving without a reload, a run's steps, an agent
killed with SIGKILL turning unhealthy, an event published from the CLI in the tail, the API
routes in the docs.

Screenshots of each page go to `test-artifacts/console/` (ignored by git); with
`CHORUS_UPDATE_SCREENSHOTS=1` they also replace the README's, in `docs/console/`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from chorus.config import Settings
from chorus.gateway.keys import local_key
from chorus.gateway.openapi import document
from chorus.nats.server import NatsServer
from tests.helpers import ROOT, child_env, write_spec
from tests.test_gateway_schemathesis import Child, free_port

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="the console's browser tests need Debian's chromium at /usr/bin/chromium "
    "(apt-get install -y chromium; .ci/run installs it)",
)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts" / "console"
README_SHOTS = ROOT / "docs" / "console"
WAIT_MS = 20_000  # for what the page shows: processes on a loaded 2-core machine

WORKFLOW = """\
type: pipeline
name: console-brief
steps:
  - name: research
    agent: researcher
    instructions: Find the key facts about the question.
  - name: write
    capability: writing
    instructions: Write a short brief.
"""
WAITING = """\
type: pipeline
name: console-waits
steps:
  - name: wait
    capability: nobody-has-this
"""
SENTINEL = """\
name: sentinel
model: offline
instructions: Stand by.
capabilities: [standby]
"""


@dataclass
class System:
    url: str
    key: str
    env: dict[str, str]
    root: Path
    prefix: str
    children: dict[str, Child] = field(default_factory=dict)

    def chorus(self, *args: str) -> str:
        """A `chorus` command against this system; its standard output."""
        done = subprocess.run(
            [sys.executable, "-m", "chorus", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    root = tmp_path_factory.mktemp("console")
    server = NatsServer(root / "js").start()
    settings = Settings(
        nats_url=server.url, prefix=f"c{uuid.uuid4().hex[:8]}", heartbeat_interval=0.2
    )
    env = child_env(settings) | {
        # unhealthy after 3 missed beats (0.6 s), dead only after 25 (5 s): the page can show it
        "CHORUS_UNHEALTHY_AFTER": "3",
        "CHORUS_DEAD_AFTER": "25",
        "CHORUS_OFFLINE_CHUNK_DELAY": "0.02",  # the answer streams for a moment
    }
    keys_file, key_file = local_key(root)
    port = free_port()
    agents = ROOT / "shared" / "chorus" / "examples" / "agents"
    sentinel = write_spec(root, "sentinel", SENTINEL)
    system = System(
        f"http://127.0.0.1:{port}", key_file.read_text().strip(), env, root, settings.prefix
    )
    try:
        for name, args, marker in (
            ("coordinator", ["coordinator"], "coordinator ready"),
            ("orchestrator", ["orchestrator"], "orchestrator ready"),
            ("gateway", ["gateway", "--port", str(port), "--keys", str(keys_file)], "listening"),
            ("researcher", ["agent", "run", str(agents / "researcher.yaml")], "agent ready"),
            ("writer", ["agent", "run", str(agents / "writer.yaml")], "agent ready"),
            (
                "sentinel",
                ["agent", "run", str(sentinel), "--instance", "sentinel-console"],
                "agent ready",
            ),
        ):
            child = Child(args, env, root / f"{name}.log", marker)
            system.children[name] = child
            child.wait_ready()
        yield system
    finally:
        for child in reversed(system.children.values()):
            child.stop()
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield launched
        launched.close()


@dataclass
class Console:
    """One browser tab on the console, and what the browser said was wrong on it."""

    page: Page
    url: str
    problems: list[str] = field(default_factory=list)

    def open(self, path: str) -> None:
        self.problems.clear()
        self.page.goto(self.url + path)

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        if os.environ.get("CHORUS_UPDATE_SCREENSHOTS") == "1":
            README_SHOTS.mkdir(parents=True, exist_ok=True)
            (README_SHOTS / f"{name}.png").write_bytes(path.read_bytes())

    def assert_clean(self) -> None:
        """No script error and nothing the Content-Security-Policy refused."""
        assert not self.problems, self.problems


def new_console(browser: Browser, url: str) -> Console:
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    page = context.new_page()
    console = Console(page, url)

    def on_message(message: ConsoleMessage) -> None:
        text = message.text
        if "Content Security Policy" in text or "Content-Security-Policy" in text:
            console.problems.append(text)

    page.on("console", on_message)
    page.on("pageerror", lambda error: console.problems.append(f"page error: {error}"))
    return console


def sign_in(console: Console, key: str) -> None:
    page = console.page
    console.open("/")
    expect(page.locator("#key-form")).to_be_visible(timeout=WAIT_MS)
    page.fill("#key-input", key)
    page.click("#key-form button[type=submit]")
    expect(page.locator("table#runs")).to_be_visible(timeout=WAIT_MS)


@pytest.fixture(scope="module")
def signed_in(browser: Browser, system: System) -> Console:
    """A tab that has been given the key once (it stays in the tab's sessionStorage)."""
    console = new_console(browser, system.url)
    sign_in(console, system.key)
    return console


def test_the_console_asks_for_an_api_key_and_then_shows_the_runs(
    browser: Browser, system: System
) -> None:
    console = new_console(browser, system.url)
    console.open("/")
    page = console.page

    expect(page.locator("#key-form")).to_contain_text("needs an API key", timeout=WAIT_MS)
    page.fill("#key-input", "chorus_not-a-key")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-form")).to_contain_text("does not know that API key")
    page.fill("#key-input", system.key)
    page.click("#key-form button[type=submit]")
    expect(page.locator("h1")).to_have_text("Runs", timeout=WAIT_MS)
    console.assert_clean()


def test_a_gateway_without_keys_serves_the_console_without_asking_for_one(
    browser: Browser, system: System
) -> None:
    port = free_port()
    gateway = Child(
        ["gateway", "--port", str(port), "--no-auth"],
        system.env,
        system.root / "open-gateway.log",
        "listening",
    )
    try:
        gateway.wait_ready()
        console = new_console(browser, f"http://127.0.0.1:{port}")
        console.open("/agents")

        expect(console.page.locator('section.agent[data-agent="writer"]')).to_be_visible(
            timeout=WAIT_MS
        )
        assert console.page.locator("#key-form").count() == 0
        console.assert_clean()
    finally:
        gateway.stop()


def test_a_run_started_from_the_cli_appears_without_a_reload_and_its_page_shows_its_steps(
    signed_in: Console, system: System
) -> None:
    console, page = signed_in, signed_in.page
    console.open("/")
    expect(page.locator("table#runs")).to_be_visible(timeout=WAIT_MS)
    page.evaluate("window.stillTheSamePage = true")
    workflow = system.root / "console-brief.yaml"
    workflow.write_text(WORKFLOW)

    run_id = system.chorus("run", str(workflow), "What is JetStream?", "--detach").strip()

    row = page.locator(f'tr[data-run-id="{run_id}"]')
    expect(row).to_be_visible(timeout=WAIT_MS)
    expect(row).to_have_attribute("data-status", "completed", timeout=WAIT_MS)
    expect(row).to_contain_text("console-brief")
    assert page.evaluate("window.stillTheSamePage === true")
    console.shot("runs")

    row.locator("a").click()
    steps = page.locator("#steps li.step")
    expect(steps).to_have_count(2, timeout=WAIT_MS)
    expect(steps.nth(0)).to_have_attribute("data-step", "research")
    expect(steps.nth(1)).to_have_attribute("data-step", "write")
    expect(steps.nth(0)).to_contain_text("researcher")
    expect(page.locator("#run-output")).to_contain_text("[offline]")
    expect(page.locator("#live-output")).to_contain_text("[offline]")
    expect(page.locator("#cancel")).to_be_disabled()
    steps.nth(0).locator("summary").click()
    expect(steps.nth(0)).to_contain_text("What is JetStream?")  # its input
    console.shot("run")
    console.assert_clean()


def test_the_cancel_button_cancels_a_running_run(signed_in: Console, system: System) -> None:
    console, page = signed_in, signed_in.page
    workflow = system.root / "console-waits.yaml"
    workflow.write_text(WAITING)  # its one step waits for an agent nobody runs
    run_id = system.chorus("run", str(workflow), "anyone?", "--detach").strip()
    console.open(f"/runs/{run_id}")
    status = page.locator(".heading .badge").first
    expect(status).to_have_text("running", timeout=WAIT_MS)

    page.click("#cancel")

    expect(status).to_have_text("cancelled", timeout=WAIT_MS)
    expect(page.locator("#cancel")).to_be_disabled()
    console.assert_clean()


def test_an_agent_killed_with_sigkill_turns_unhealthy_on_the_agents_page(
    signed_in: Console, system: System
) -> None:
    console, page = signed_in, signed_in.page
    console.open("/agents")
    instance = page.locator('tr[data-instance="sentinel-console"]')
    expect(instance).to_have_attribute("data-health", "healthy", timeout=WAIT_MS)
    expect(page.locator('section.agent[data-agent="sentinel"]')).to_contain_text("standby")

    system.children["sentinel"].process.send_signal(signal.SIGKILL)

    expect(instance).to_have_attribute("data-health", "unhealthy", timeout=WAIT_MS)
    expect(instance.locator(".badge").first).to_have_text("unhealthy")
    expect(page.locator('tr[data-instance^="researcher-"]')).to_have_attribute(
        "data-health", "healthy"
    )
    console.shot("agents")
    console.assert_clean()


def test_the_tail_shows_an_event_published_from_the_cli(signed_in: Console, system: System) -> None:
    console, page = signed_in, signed_in.page
    console.open("/tail")
    expect(page.locator("#tail-status")).to_contain_text("following", timeout=WAIT_MS)
    subject = f"{system.prefix}.event.console.check"

    system.chorus("pub", subject, '{"note": "hello from the CLI"}')

    line = page.locator(f'#tail li.line[data-subject="{subject}"]')
    expect(line).to_be_visible(timeout=WAIT_MS)
    expect(line).to_contain_text("event")
    expect(line).to_contain_text("hello from the CLI")
    console.shot("tail")
    console.assert_clean()


def test_the_docs_page_shows_every_route_of_the_api(signed_in: Console) -> None:
    console, page = signed_in, signed_in.page
    console.open("/docs")
    operations = page.locator("#operations article.operation")
    paths = document()["paths"]
    expected = sum(len(methods) for methods in paths.values())

    expect(operations).to_have_count(expected, timeout=WAIT_MS)
    for path in paths:
        expect(page.locator(f'article.operation[data-path="{path}"]').first).to_be_visible()
    expect(page.locator("#schema-RunRecord")).to_contain_text("run_id")
    console.shot("docs")
    console.assert_clean()


def test_the_pages_hold_no_data_and_allow_scripts_from_the_gateway_only(system: System) -> None:
    with httpx.Client(base_url=system.url, timeout=10, trust_env=False) as http:
        page = http.get("/runs/some-run")
        script = http.get("/console/main.js")
        missing = http.get("/console/..%2Fkeys.py")
        tail = http.get("/api/tail/stream")

    assert page.status_code == 200
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    assert script.headers["content-type"].startswith("text/javascript")
    assert missing.status_code == 404
    assert tail.status_code == 401
