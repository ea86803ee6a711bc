"""Install from a signed bundle with the network cut off, upgrade with data, roll back.

Everything is real: a throwaway GPG release key, `animus bundle build` (wheels from the
committed lock, the runner image), `install.sh --bundle` inside a network namespace with
only a loopback interface (no route anywhere: pip, Ansible and the appliance work offline
or fail), the Ansible single-host play, runc containers, the local registry. Version 2.0.0
is built from a copy of this checkout with one more schema migration, so the upgrade
migrates and the rollback reverts it.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.bundle.build import build_bundle
from appliance.db import available_migrations
from tests.integration.bundle.conftest import Signer, generate_signer
from tests.integration.execution.conftest import _git

ROOT = Path(__file__).resolve().parents[3]
WALK = Path(__file__).with_name("walk_project.py")
API = "http://127.0.0.1:8080"
PROBE_MIGRATION = '''"""A table only release 2.0.0 knows (the upgrade test's probe)."""


def upgrade(schema) -> None:
    schema.execute("CREATE TABLE release_probe (id TEXT PRIMARY KEY)")


def downgrade(schema) -> None:
    schema.execute("DROP TABLE release_probe")
'''

pytestmark = pytest.mark.slow


class Namespace:
    """A network namespace with only a loopback interface: no route leaves it."""

    def __init__(self) -> None:
        self.name = f"animus-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.run("ip", "link", "set", "lo", "up", check=True)

    def command(self, *argv: str | Path) -> list[str]:
        """ARGV run in the namespace. Only the network namespace changes: `ip netns exec`
        would also remount /sys, hiding the cgroup hierarchy runc needs."""
        return ["nsenter", f"--net=/run/netns/{self.name}", "--", *map(str, argv)]

    def run(self, *argv: str | Path, check: bool = False, timeout: float = 600, env=None):
        return subprocess.run(
            self.command(*argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            env=env,
        )

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False)


def _source_copy(destination: Path, extra_migration: str | None) -> Path:
    """This checkout's files as a bundle is built from them (no venv, no git, no tests)."""
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", ".animus-demo*", "tests", ".pytest_cache"
    )
    shutil.copytree(ROOT, destination, ignore=ignore, symlinks=True)
    if extra_migration:
        number = len(available_migrations()) + 1
        path = destination / "appliance" / "migrations" / f"m{number:04d}_release_probe.py"
        path.write_text(extra_migration)
    return destination


@pytest.fixture(scope="module")
def release_key() -> Iterator[Signer]:
    base = Path(tempfile.mkdtemp(prefix="animus-gpg-"))
    try:
        yield generate_signer(base / "release", "Animus Release Test <release@example.test>")
    finally:
        subprocess.run(
            ["gpgconf", "--homedir", str(base / "release"), "--kill", "all"], check=False
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def bundles(release_key, tmp_path_factory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("bundles")
    built = {}
    for version, migration in (("1.0.0", None), ("2.0.0", PROBE_MIGRATION)):
        source = _source_copy(out / f"src-{version}", migration)
        built[version] = build_bundle(
            version,
            release_key.fingerprint,
            out,
            images=("runner",),
            gnupghome=release_key.home,
            repo_root=source,
            min_upgrade_from="1.0.0" if version == "2.0.0" else None,
        )
    return built


@pytest.fixture(scope="module")
def namespace() -> Iterator[Namespace]:
    ns = Namespace()
    yield ns
    ns.delete()


@pytest.fixture(scope="module")
def code_repo(tmp_path_factory) -> tuple[str, str]:
    base = tmp_path_factory.mktemp("code")
    work = base / "work"
    work.mkdir()
    spec = subprocess.run(
        [sys.executable, "-c", f"import runpy; print(runpy.run_path({str(WALK)!r})['JOB'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (work / "job.py").write_text(spec)
    _git("init", "-q", "-b", "main", cwd=work)
    _git("add", ".", cwd=work)
    _git("commit", "-q", "-m", "job", cwd=work)
    sha = _git("rev-parse", "HEAD", cwd=work)
    _git("clone", "-q", "--bare", str(work), str(base / "job.git"), cwd=base)
    return f"file://{base / 'job.git'}", sha


class Installed:
    """An installation under PREFIX, driven from inside the namespace."""

    def __init__(self, ns: Namespace, prefix: Path, key: Signer):
        self.ns, self.prefix, self.key = ns, prefix, key

    def install(self, bundle: Path, *args: str):
        env = {**os.environ, "GNUPGHOME": str(self.key.home)}
        return self.ns.run(
            "bash",
            ROOT / "install.sh",
            *("--bundle", bundle, "--trust-fingerprint", self.key.fingerprint),
            *("--prefix", self.prefix, *args),
            env=env,
            timeout=900,
        )

    def animus(self, *args: str) -> str:
        proc = self.ns.run(self.prefix / "bin" / "animus", *args)
        assert proc.returncode == 0, f"animus {args}: {proc.stderr}{proc.stdout}"
        return proc.stdout.strip()

    def python(self, *args: str | Path):
        return self.ns.run(self.prefix / "current" / "venv" / "bin" / "python", *args)

    def get(self, path: str, token: str | None = None) -> tuple[int, str]:
        code = (
            "import sys, urllib.request as u, urllib.error as e\n"
            "r = u.Request(sys.argv[1])\n"
            "if len(sys.argv) > 2: r.add_header('Authorization', 'Bearer ' + sys.argv[2])\n"
            "try:\n    x = u.urlopen(r, timeout=10); print(x.status); print(x.read().decode())\n"
            "except e.HTTPError as h:\n    print(h.code); print(h.read().decode())\n"
        )
        proc = self.python("-c", code, f"http://127.0.0.1:8080{path}", *([token] if token else []))
        assert proc.returncode == 0, proc.stderr
        status, _, body = proc.stdout.partition("\n")
        return int(status), body

    def audit_events(self) -> list[tuple[int, str, dict]]:
        with sqlite3.connect(self.prefix / "data" / "animus.db") as con:
            rows = con.execute("SELECT seq, action, payload FROM audit_events ORDER BY seq")
            return [(seq, action, json.loads(payload)) for seq, action, payload in rows]

    def stop(self) -> None:
        control = self.prefix / "bin" / "animusctl"
        if control.exists():
            self.ns.run(control, "stop", timeout=120)


@pytest.fixture(scope="module")
def installed(namespace, release_key, tmp_path_factory) -> Iterator[Installed]:
    box = Installed(namespace, tmp_path_factory.mktemp("prefix") / "animus", release_key)
    yield box
    box.stop()


def test_the_namespace_has_no_way_out(namespace):
    links = namespace.run("ip", "-o", "link", check=True).stdout
    assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
    probe = namespace.run(
        "python3", "-c", "import socket; socket.create_connection(('192.0.2.1', 443), timeout=3)"
    )
    assert probe.returncode != 0 and "unreachable" in probe.stderr.lower()


def test_install_offline_then_the_demo_project_works(installed, bundles, code_repo):
    first = bundles["1.0.0"]
    started = time.monotonic()
    result = installed.install(first.tar)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-4000:]
    print(f"install.sh → done in {elapsed:.1f} s")
    assert installed.get("/readyz")[0] == 200
    status, page = installed.get("/ui/sign-in")  # the wheel carries the UI's templates
    assert status == 200 and "<form" in page

    # The first audit event of the installation is the bundle's verification.
    seq, action, payload = installed.audit_events()[0]
    assert (seq, action) == (1, "install:bundle:verified")
    assert payload["manifest_sha256"] == first.manifest_sha256
    assert payload["signer_fingerprint"] == first.signer_fingerprint
    assert payload["version"] == "1.0.0"
    assert (installed.prefix / "VERSION").read_text().strip() == "1.0.0"

    # An ML user's project, through the API only, in runc containers, offline.
    installed.animus("admin", "create-user", "alice", "--system-admin")
    token = installed.animus("token", "create", "--user", "alice")
    digest = first.images["runner"]
    pushed = installed.animus(
        "image",
        "push",
        str(installed.prefix / "current" / "images" / "runner"),
        "127.0.0.1:5000/animus/environments",
    )
    assert pushed.endswith(digest)
    walk = installed.python(WALK, "http://127.0.0.1:8080", token, *code_repo, digest)
    assert walk.returncode == 0, walk.stderr + walk.stdout
    outcome = json.loads(walk.stdout.strip().splitlines()[-1])
    assert outcome["reproduced"] == "identical" and outcome["artifact"] == {"rows": 3}
    assert installed.animus("audit", "verify").startswith("OK ")
    installed.token, installed.walk = token, outcome


def test_installing_the_same_bundle_again_changes_nothing(installed, bundles):
    before = installed.audit_events()
    result = installed.install(bundles["1.0.0"].tar)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already unpacked and verified" in result.stderr
    assert "changed=0" in result.stdout and "failed=0" in result.stdout
    after = installed.audit_events()
    assert [e[1] for e in after[len(before) :]] == []


def test_upgrade_with_data_then_rollback_loses_nothing(installed, bundles):
    token, walk = installed.token, installed.walk
    run_path = f"/api/v1/projects/{walk['project']}/runs/{walk['run']}"
    result = installed.install(bundles["2.0.0"].tar)
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-4000:]
    assert os.readlink(installed.prefix / "current") == "releases/2.0.0"
    assert os.readlink(installed.prefix / "previous") == "releases/1.0.0"
    newest = len(available_migrations()) + 1
    assert installed.animus("db", "status") == f"schema version {newest} (newest {newest})"
    assert list((installed.prefix / "backups").iterdir()), "the upgrade made no backup"
    status, body = installed.get(run_path, token)
    assert status == 200 and json.loads(body)["state"] == "succeeded"
    upgraded = [e for e in installed.audit_events() if e[1] == "install:bundle:verified"]
    assert [e[2]["version"] for e in upgraded] == ["1.0.0", "2.0.0"]
    assert [e[2]["upgraded_from"] for e in upgraded] == [None, "1.0.0"]
    # Data made under 2.0.0 must still be there after the rollback.
    made = installed.python(WALK, "--add-version", API, token, walk["project"])
    assert made.returncode == 0, made.stderr + made.stdout
    added = json.loads(made.stdout.strip().splitlines()[-1])
    events_before = len(installed.audit_events())

    rolled = installed.ns.run(installed.prefix / "bin" / "animus", "rollback", "--json")
    assert rolled.returncode == 0, rolled.stderr + rolled.stdout
    outcome = json.loads(rolled.stdout)
    assert (outcome["from"], outcome["to"]) == ("2.0.0", "1.0.0")
    assert (outcome["schema_from"], outcome["schema_to"]) == (newest, newest - 1)
    assert os.readlink(installed.prefix / "current") == "releases/1.0.0"
    assert (installed.prefix / "VERSION").read_text().strip() == "1.0.0"
    for _ in range(100):
        if installed.get("/readyz")[0] == 200:
            break
        time.sleep(0.3)
    status, body = installed.get(run_path, token)
    assert status == 200 and json.loads(body)["state"] == "succeeded"
    status, _ = installed.get(run_path + "/artifacts/model.json", token)
    assert status == 200
    checked = installed.python(
        WALK, "--check-version", API, token, walk["project"], added["version"], added["sha256"]
    )
    assert checked.returncode == 0, checked.stderr + checked.stdout
    assert installed.animus("audit", "verify").startswith("OK ")
    events = installed.audit_events()
    assert [e[1] for e in events[events_before:]] == [
        "ops:backup:created",
        "install:release:rollback_started",
        "install:release:rolled_back",
    ]
    assert events[events_before + 1][2]["backup"] == outcome["backup"]


def summary_images(backup: Path) -> list[str]:
    return json.loads((backup / "MANIFEST.json").read_text())["environment_images"]


def test_disaster_on_the_installed_layout_loses_nothing(installed, tmp_path_factory):
    """An installation made by install.sh: backup while it runs → the services stop and the
    whole data dir is lost → restore → the audit chain verifies, the run's artifact
    downloads with its digest and its replay reproduces. The registry's storage sits beside
    data/ (PREFIX/registry), so the image the runs are pinned to is still there."""
    token, walk = installed.token, installed.walk
    backup = tmp_path_factory.mktemp("backup") / "before-the-disaster"
    summary = json.loads(installed.animus("backup", str(backup), "--json"))
    installed.stop()
    shutil.rmtree(installed.prefix / "data")

    restored = json.loads(installed.animus("restore", str(backup), "--json"))
    assert restored["audit_head"] == summary["audit_head"]
    # The registry is stopped with the other services: the pinned image is not checked, and
    # not called missing; the replay below shows it is still there.
    assert restored["environment_images_missing"] == []
    assert restored["environment_images_unchecked"] == summary_images(backup) != []
    started = installed.ns.run(installed.prefix / "bin" / "animusctl", "start", timeout=120)
    assert started.returncode == 0, started.stderr + started.stdout
    for _ in range(100):
        if installed.get("/readyz")[0] == 200:
            break
        time.sleep(0.3)
    assert installed.animus("audit", "verify").startswith("OK ")
    replayed = installed.python(
        WALK, "--replay", "http://127.0.0.1:8080", token, walk["project"], walk["run"]
    )
    assert replayed.returncode == 0, replayed.stderr + replayed.stdout
    outcome = json.loads(replayed.stdout.strip().splitlines()[-1])
    assert outcome["reproduced"] == "identical" and outcome["artifact"] == {"rows": 3}
