"""``animus demo``: start the appliance on the embedded default and walk a seeded project.

Everything goes through the public HTTP API, as a user's own script would, so the demo also
shows how to use it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib import error, request

import click

DEMO_ADMIN = "demo-admin"
DEMO_VIEWER = "demo-viewer"


@dataclass
class DemoApi:
    """A minimal client of the public API (standard library only)."""

    base: str
    token: str

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        data: bytes | None = None,
        content_type: str | None = None,
    ) -> dict:
        headers = {"Authorization": f"Bearer {self.token}"}
        if body is not None:
            data = json.dumps(body).encode()
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        req = request.Request(self.base + path, data=data, method=method, headers=headers)  # noqa: S310
        try:
            with request.urlopen(req, timeout=60) as response:  # noqa: S310 (loopback URL)
                raw = response.read()
        except error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise click.ClickException(f"{method} {path} failed: {exc.code} {detail}") from None
        return json.loads(raw) if raw else {}


def credit_risk_csv(rows: int = 2000, seed: int = 7) -> bytes:
    """A small, deterministic tabular dataset: applicant features and a default label."""
    rng = random.Random(seed)  # noqa: S311 (reproducible data)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["age", "income_k", "debt_ratio", "late_payments", "years_employed", "default"])
    for _ in range(rows):
        age = rng.randint(21, 70)
        income = round(rng.lognormvariate(3.8, 0.4), 1)
        debt = round(min(rng.betavariate(2, 5) * 1.5, 1.5), 3)
        late = min(int(rng.expovariate(1.2)), 9)
        employed = max(0, min(age - 18, int(rng.gammavariate(2, 3))))
        risk = -3.2 + 2.4 * debt + 0.45 * late - 0.012 * income - 0.05 * employed
        label = 1 if rng.random() < 1 / (1 + pow(2.718281828, -risk)) else 0
        writer.writerow([age, income, debt, late, employed, label])
    return out.getvalue().encode()


def tar_of(files: dict[str, bytes]) -> bytes:
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 0
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _git_head(repo: Path) -> tuple[str, str] | None:
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"file://{repo.resolve()}", sha


def _wait_ready(base: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise click.ClickException("the control plane exited during start-up; see its log")
        try:
            with request.urlopen(base + "/readyz", timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    return
        except (error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise click.ClickException(f"the control plane did not become ready within {timeout:.0f} s")


def run_demo(*, port: int, serve: bool, say: Callable[[str], None]) -> None:
    from appliance import db
    from appliance.audit import log as audit_log
    from appliance.auth import identities
    from appliance.config import Config
    from appliance.domain.context import SYSTEM, Context
    from appliance.domain.records import User

    data_dir = Path(os.environ.get("ANIMUS_DATA_DIR", ".animus-demo")).absolute()
    os.environ["ANIMUS_DATA_DIR"] = str(data_dir)
    config = Config.from_env()
    say(f"1/6 database: {config.effective_database_url.split('@')[-1]}")
    db.bind(db.open_database(config.effective_database_url))
    db.upgrade(log=lambda line: say(f"    {line}"))

    ctx = Context(SYSTEM, "demo")
    say("2/6 users: demo-admin (system admin, owns the demo project), demo-viewer")
    for name, role in ((DEMO_ADMIN, "admin"), (DEMO_VIEWER, None)):
        if User.get_or_none(User.username == name) is None:
            identities.create_user(ctx, name, None, role)
    _, admin_token = identities.issue_token(
        ctx, ttl_seconds=7 * 86400, user=identities.user_by_name(DEMO_ADMIN), name="demo"
    )
    _, viewer_token = identities.issue_token(
        ctx, ttl_seconds=7 * 86400, user=identities.user_by_name(DEMO_VIEWER), name="demo"
    )
    db.database.close_all()

    base = f"http://127.0.0.1:{port}"
    log_path = data_dir / "control-plane.log"
    say(f"3/6 control plane: {base} (log: {log_path})")
    with open(log_path, "ab") as log_file:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-upgrade",
            ],
            stdout=log_file,
            stderr=log_file,
            env={**os.environ},
        )
    try:
        _wait_ready(base, server)
        api = DemoApi(base, admin_token)
        say("4/6 project, dataset version, code ref, environment, viewer role")
        name = f"credit-risk-{secrets.token_hex(2)}"
        project = api.call(
            "POST",
            "/api/v1/projects",
            {"name": name, "description": "Seeded by ./install.sh --demo"},
        )
        pid = project["id"]
        dataset = api.call("POST", f"/api/v1/projects/{pid}/datasets", {"name": "applicants"})
        version = api.call(
            "POST",
            f"/api/v1/projects/{pid}/datasets/{dataset['id']}/versions",
            data=tar_of(
                {
                    "applicants.csv": credit_risk_csv(),
                    "README.txt": b"Synthetic credit applicants; label: default.\n",
                }
            ),
            content_type="application/x-tar",
        )
        say(f"    dataset version {version['id']} {version['digest']}")
        head = _git_head(Path(__file__).resolve().parents[1])
        if head:
            code = api.call(
                "POST",
                f"/api/v1/projects/{pid}/code-refs",
                {"repo_url": head[0], "commit_sha": head[1]},
            )
            say(f"    code ref {code['id']} at commit {code['commit_sha'][:12]}")
        environment = api.call(
            "POST",
            f"/api/v1/projects/{pid}/environments",
            {"name": "sklearn", "base_image": "runner", "packages": ["numpy", "scikit-learn"]},
        )
        say(f"    environment {environment['id']} (locks are built by `animus env build`)")
        api.call("PUT", f"/api/v1/projects/{pid}/members/{DEMO_VIEWER}", {"role": "viewer"})
        snapshot = api.call("POST", f"/api/v1/projects/{pid}/policy-snapshots")
        say(f"    policy snapshot {snapshot['id']} {snapshot['digest']}")

        say("5/6 audit chain")
        db.bind(db.open_database(config.effective_database_url))
        verdict = audit_log.verify()
        db.database.close_all()
        say(f"    {verdict}")
        if not verdict.ok:
            raise click.ClickException("the audit chain does not verify")

        say("6/6 done. Try it:")
        say(f"    export ANIMUS_URL={base} ANIMUS_TOKEN={admin_token}")
        say(
            '    curl -s -H "Authorization: Bearer $ANIMUS_TOKEN" '
            f"$ANIMUS_URL/api/v1/projects/{pid} "
        )
        say(
            '    curl -s -H "Authorization: Bearer $ANIMUS_TOKEN" '
            f"$ANIMUS_URL/api/v1/projects/{pid}/audit-events"
        )
        say(f"    viewer token (read-only): {viewer_token}")
        say(f"    API reference: {base}/api/v1/openapi.json · docs/api.md")
        say(f"    ANIMUS_DATA_DIR={data_dir} .venv/bin/animus audit verify")
        if serve:
            say("Serving until Ctrl-C.")
            server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(10)
