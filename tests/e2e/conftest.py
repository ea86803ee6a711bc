"""Browser tests: Debian's Chromium driven by Playwright against a running appliance.

The appliance is the real single-host installation (``serve``, ``scheduler`` and
``dataplane`` processes, runc containers, a docker-registry holding the runner image), the
same as the governed-runs tests start. Every page a test opens is watched: console errors,
page errors and any request that leaves the appliance's origin fail the test. Screenshots
go to ``test-artifacts/e2e/<test>/`` (kept out of git).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.integration import conftest as integration
from tests.integration.execution import test_governed_runs as governed
from tests.integration.execution.test_governed_runs import Appliance

# The real parts, shared with the integration tests: the runner image in a docker-registry,
# a git repository of user code (job.py), the appliance's processes.
runner_image = integration.runner_image
registry = integration.registry
registry_client = integration.registry_client
pushed_runner = integration.pushed_runner
code_job = governed.code_job

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "e2e"
PASSWORD = "correct horse battery"


@pytest.fixture(scope="session")
def chromium() -> Iterator[object]:
    """One headless Chromium for the session (Playwright cannot download its own here).

    Playwright gives the browser a fresh temporary profile of its own (its replacement for
    ``--user-data-dir``) and removes it on close.
    """
    if not CHROMIUM.exists():
        pytest.fail("Chromium is not installed: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=CHROMIUM_FLAGS,
        )
        yield browser
        browser.close()


@dataclass
class Watch:
    """What a browser context did: every request URL, console errors and page errors."""

    origin: str
    requests: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    documents: int = 0

    def attach(self, page) -> None:
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("response", self.check_document)
        page.on(
            "console",
            lambda message: (
                self.problems.append(f"console {message.type}: {message.text}")
                if message.type in ("error", "warning")
                else None
            ),
        )
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))

    def check_document(self, response) -> None:
        """Every page the browser loads is served with the strict policy (so enforced)."""
        if response.request.resource_type != "document" or response.status in (301, 302, 303):
            return
        self.documents += 1
        policy = response.headers.get("content-security-policy", "")
        if "script-src 'self'" not in policy or "default-src 'none'" not in policy:
            self.problems.append(f"no strict Content-Security-Policy on {response.url}")

    def off_host(self) -> list[str]:
        return [
            url
            for url in self.requests
            if not (url.startswith(self.origin + "/") or url.startswith(("data:", "blob:")))
        ]


class Person:
    """One person's browser: a private context, watched, with numbered screenshots."""

    def __init__(self, chromium, origin: str, name: str, shots: Path, *, width: int = 1280):
        self.name = name
        self.origin = origin
        self.context = chromium.new_context(
            base_url=origin,
            viewport={"width": width, "height": 900},
            accept_downloads=True,
        )
        self.watch = Watch(origin)
        self.page = self.context.new_page()
        self.watch.attach(self.page)
        self.shots = shots
        self.count = 0

    def shot(self, label: str) -> Path:
        self.count += 1
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{self.name}-{self.count:02d}-{label}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def sign_in(self, username: str, password: str = PASSWORD) -> None:
        self.page.goto("/ui/sign-in")
        self.page.get_by_label("Username").fill(username)
        self.page.get_by_label("Password").fill(password)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_url(re.compile(r"^[^?]*/ui/(projects|audit)"))

    def csrf(self) -> str:
        return self.page.locator('input[name="csrf_token"]').first.get_attribute("value")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def appliance(tmp_path, registry, pushed_runner, code_job) -> Iterator[Appliance]:
    """A running single-host appliance with local users for each persona."""
    box = Appliance(tmp_path, registry.address)
    box.animus("db", "upgrade")
    for username, role in (
        ("alice", None),
        ("root", "--system-admin"),
        ("audrey", "--auditor"),
        ("victor", None),
    ):
        flags = [role] if role else []
        box.animus(
            "admin", "create-user", username, *flags, "--password-stdin", stdin=PASSWORD + "\n"
        )
    box.env["ANIMUS_DATAPLANE_TOKEN"] = box.animus("dataplane", "register", "host1")
    box.start("serve", "serve", "--port", str(box.port), "--no-upgrade")
    box.start("scheduler", "scheduler", "--interval", "0.2")
    box.start("dataplane", "dataplane", "--capacity", "2")
    for _ in range(150):
        try:
            if requests.get(box.url + "/readyz", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    else:
        pytest.fail("the appliance did not become ready")
    box.code_job = code_job
    box.image_digest = pushed_runner.split("@")[1]
    yield box
    box.stop()


@pytest.fixture
def people(chromium, appliance, request) -> Iterator[callable]:
    """Open a watched browser for a person; at the end, no console error, nothing off-host."""
    shots = ARTIFACTS / request.node.name
    shutil.rmtree(shots, ignore_errors=True)
    opened: list[Person] = []

    def open_for(name: str, **options) -> Person:
        person = Person(chromium, appliance.url, name, shots, **options)
        opened.append(person)
        return person

    yield open_for
    for person in opened:
        person.close()
    print(f"\nscreenshots: {shots}")
    for person in opened:
        assert person.watch.documents, f"{person.name}'s browser loaded no page"
        assert person.watch.off_host() == [], f"{person.name}'s pages left the host"
        assert person.watch.problems == [], f"{person.name}: {person.watch.problems}"
