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
import shutil
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

    def raw(self, method: str, path: str) -> bytes:
        """The body of a response that is not JSON (a download)."""
        req = request.Request(  # noqa: S310 (loopback URL)
            self.base + path, method=method, headers={"Authorization": f"Bearer {self.token}"}
        )
        with request.urlopen(req, timeout=120) as response:  # noqa: S310 (loopback URL)
            return response.read()


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


REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CODE = REPO_ROOT / "demo" / "credit-risk"
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "Animus Demo",
    "GIT_AUTHOR_EMAIL": "demo@animus.invalid",
    "GIT_COMMITTER_NAME": "Animus Demo",
    "GIT_COMMITTER_EMAIL": "demo@animus.invalid",
    # Fixed dates: the same demo code always becomes the same commit SHA.
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
}


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **_GIT_ENV},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def code_repository(data_dir: Path) -> tuple[str, str]:
    """The demo's training code as a bare git repository the Data Plane can reach."""
    work = data_dir / "code-work"
    bare = data_dir / "code.git"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy2(DEMO_CODE / "train.py", work / "train.py")
    _git("init", "-q", "-b", "main", cwd=work)
    _git("add", "train.py", cwd=work)
    _git("commit", "-q", "-m", "Train the credit-risk model", cwd=work)
    shutil.rmtree(bare, ignore_errors=True)
    _git("clone", "-q", "--bare", str(work), str(bare), cwd=data_dir)
    return f"file://{bare}", _git("rev-parse", "HEAD", cwd=work)


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


def _wait_run(api: DemoApi, pid: str, run_id: str, say, timeout: float = 600) -> dict:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        run = api.call("GET", f"/api/v1/projects/{pid}/runs/{run_id}")
        if run["state"] != last:
            say(f"    {run_id}: {run['state']}")
            last = run["state"]
        if run["state"] in ("succeeded", "failed", "canceled"):
            return run
        time.sleep(0.5)
    raise click.ClickException(f"run {run_id} did not finish within {timeout:.0f} s")


class Processes:
    """The appliance's processes for the demo; stopped together."""

    def __init__(self, log_dir: Path, env: dict[str, str]):
        self.log_dir = log_dir
        self.env = env
        self.running: list[subprocess.Popen] = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "appliance", *args],
                stdout=log_file,
                stderr=log_file,
                env=self.env,
            )
        self.running.append(process)
        return process

    def stop(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.terminate()
        for process in self.running:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def run_demo(*, port: int, registry_port: int, serve: bool, say: Callable[[str], None]) -> None:
    from appliance import db
    from appliance.audit import log as audit_log
    from appliance.auth import identities
    from appliance.config import Config
    from appliance.domain.context import SYSTEM, Context
    from appliance.domain.records import User
    from appliance.images.build import build_image
    from appliance.images.definition import load_definition
    from appliance.images.envbuild import build_environment, load_environment_definition
    from appliance.images.layout import Layout
    from appliance.images.packages import fill_wheelhouse
    from appliance.images.progress import StreamProgress
    from appliance.images.registry import RegistryClient, push_image
    from appliance.images.registry_server import RegistrySettings, start_registry

    data_dir = Path(os.environ.get("ANIMUS_DATA_DIR", ".animus-demo")).absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "ANIMUS_DATA_DIR": str(data_dir),
        "ANIMUS_REGISTRY_URL": f"http://127.0.0.1:{registry_port}",
        "ANIMUS_ENVIRONMENT_REPOSITORY": "animus/environments",
        "ANIMUS_CONTROL_PLANE_URL": f"http://127.0.0.1:{port}",
        "ANIMUS_DATAPLANE_DIR": str(data_dir / "dataplane"),
        "ANIMUS_SECRETS_DIR": str(data_dir.parent / (data_dir.name + "-secrets")),
    }
    os.environ.update(env)
    config = Config.from_env()
    progress = StreamProgress(sys.stdout)
    processes = Processes(data_dir, env)

    say(f"1/10 database: {config.effective_database_url.split('@')[-1]}")
    db.bind(db.open_database(config.effective_database_url))
    db.upgrade(log=lambda line: say(f"    {line}"))
    ctx = Context(SYSTEM, "demo")
    for name, role in ((DEMO_ADMIN, "admin"), (DEMO_VIEWER, None)):
        if User.get_or_none(User.username == name) is None:
            identities.create_user(ctx, name, None, role)
    _, admin_token = identities.issue_token(
        ctx, ttl_seconds=7 * 86400, user=identities.user_by_name(DEMO_ADMIN), name="demo"
    )
    _, viewer_token = identities.issue_token(
        ctx, ttl_seconds=7 * 86400, user=identities.user_by_name(DEMO_VIEWER), name="demo"
    )
    plane_name = f"demo-host-{secrets.token_hex(2)}"
    _, env["ANIMUS_DATAPLANE_TOKEN"] = identities.register_data_plane(ctx, plane_name, "runc")
    db.database.close_all()

    say(f"2/10 local OCI registry on 127.0.0.1:{registry_port}")
    registry = start_registry(
        RegistrySettings(state_dir=data_dir / "registry", listen=f"127.0.0.1:{registry_port}"),
        log=data_dir / "registry.log",
    )
    try:
        client = RegistryClient(registry.address)
        say("3/10 runner image: built reproducibly from its lock, pushed by digest")
        built = build_image(
            load_definition(REPO_ROOT / "images" / "runner"),
            data_dir / "images" / "runner",
            progress=progress,
        )
        layout = Layout(built.layout)
        runner = push_image(layout, layout.image(), client, "animus/runner", progress=progress)
        say(f"    {runner.reference}")

        say("4/10 environment: scikit-learn + numpy from the offline wheelhouse")
        definition = load_environment_definition(DEMO_CODE / "environment.toml")
        wheelhouse = REPO_ROOT / "offline-wheels"
        if not any(wheelhouse.glob("scikit_learn-*.whl")):
            say(f"    filling {wheelhouse} (build-host step; a bundle carries it)")
            fill_wheelhouse(definition.packages, wheelhouse)
        lock_data = build_environment(
            definition,
            base=runner.reference,
            wheelhouse=wheelhouse,
            client=client,
            repository="animus/environments",
            progress=progress,
        )
        say(f"    {lock_data['image_reference']}")

        say(f"5/10 control plane http://127.0.0.1:{port}, scheduler, Data Plane agent (runc)")
        server = processes.start(
            "control-plane", "serve", "--host", "127.0.0.1", "--port", str(port), "--no-upgrade"
        )
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, server)
        processes.start("scheduler", "scheduler", "--interval", "0.3")
        processes.start("dataplane", "dataplane", "--capacity", "2")
        api = DemoApi(base, admin_token)

        say("6/10 project, dataset version, code at a commit, environment lock")
        project = api.call(
            "POST",
            "/api/v1/projects",
            {
                "name": f"credit-risk-{secrets.token_hex(2)}",
                "description": "Seeded by ./install.sh --demo",
            },
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
        repo_url, sha = code_repository(data_dir)
        code = api.call(
            "POST", f"/api/v1/projects/{pid}/code-refs", {"repo_url": repo_url, "commit_sha": sha}
        )
        say(f"    code ref {code['id']} at commit {sha[:12]}")
        environment = api.call(
            "POST",
            f"/api/v1/projects/{pid}/environments",
            {
                "name": definition.name,
                "base_image": runner.reference,
                "packages": list(definition.packages),
            },
        )
        lock = api.call(
            "POST",
            f"/api/v1/projects/{pid}/environment-locks",
            {
                "environment_id": environment["id"],
                "image_digest": lock_data["image_digest"],
                "packages": [
                    {
                        "name": p["name"],
                        "version": p["version"],
                        "sha256": "sha256:" + p["sha256"].removeprefix("sha256:"),
                    }
                    for p in lock_data["packages"]
                ],
            },
        )
        say(f"    environment lock {lock['id']} {lock['image_digest']}")
        api.call("PUT", f"/api/v1/projects/{pid}/members/{DEMO_VIEWER}", {"role": "viewer"})

        say("7/10 production run: train the model in a runc container")
        run = api.call(
            "POST",
            f"/api/v1/projects/{pid}/runs",
            {
                "production": True,
                "code_ref_id": code["id"],
                "environment_lock_id": lock["id"],
                "inputs": [{"name": "applicants", "dataset_version_id": version["id"]}],
                "command": ["python3", "train.py", "--c", "0.5"],
                "parameters": {"c": 0.5},
                "env": {"OMP_NUM_THREADS": "1"},
            },
        )
        run = _wait_run(api, pid, run["id"], say)
        if run["state"] != "succeeded":
            raise click.ClickException(f"the training run {run['state']}: {run['reason']}")
        metrics = api.call("GET", f"/api/v1/projects/{pid}/runs/{run['id']}/metrics")["metrics"]
        say("    metrics: " + ", ".join(f"{k}={v[-1]['value']}" for k, v in metrics.items()))
        for artifact in api.call("GET", f"/api/v1/projects/{pid}/runs/{run['id']}/artifacts"):
            say(f"    artifact {artifact['path']} sha256:{artifact['sha256'][:16]}…")

        say("8/10 replay from the frozen execution snapshot")
        replay = api.call("POST", f"/api/v1/projects/{pid}/runs/{run['id']}/replay")
        replay = _wait_run(api, pid, replay["id"], say)
        verdict = api.call("GET", f"/api/v1/projects/{pid}/runs/{replay['id']}")["reproducibility"]
        say(f"    reproduced: {verdict['reproduced']}")
        if verdict["reproduced"] != "identical":
            raise click.ClickException(f"the replay differs: {verdict['differences']}")

        say("9/10 model registry: register, approve, export the signed package, verify it")
        model = api.call(
            "POST",
            f"/api/v1/projects/{pid}/models",
            {"name": "credit-default", "description": "Logistic regression"},
        )
        model_version = api.call(
            "POST",
            f"/api/v1/projects/{pid}/models/{model['id']}/versions",
            {"run_id": run["id"], "artifact_path": "model.json"},
        )
        api.call(
            "POST",
            f"/api/v1/projects/{pid}/model-versions/{model_version['id']}/approve",
            {"reason": "AUC and accuracy reviewed; replay reproduced it identically"},
        )
        export = api.call(
            "POST", f"/api/v1/projects/{pid}/model-versions/{model_version['id']}/export"
        )
        package = data_dir / f"{model_version['id']}.tar"
        package.write_bytes(
            api.raw("GET", f"/api/v1/projects/{pid}/model-versions/{model_version['id']}/export")
        )
        verifier = REPO_ROOT / "appliance" / "audit" / "verify_export.py"
        checked = subprocess.run(
            [
                sys.executable,
                "-I",
                str(verifier),
                str(package),
                "--trust-fingerprint",
                export["signing_fingerprint"],
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if checked.returncode != 0:
            raise click.ClickException(
                f"the export does not verify: {checked.stdout}{checked.stderr}"
            )
        say(f"    {package.name}: {checked.stdout.strip().splitlines()[-1]}")

        say("10/10 audit chain")
        db.bind(db.open_database(config.effective_database_url))
        chain = audit_log.verify()
        db.database.close_all()
        say(f"    {chain}")
        if not chain.ok:
            raise click.ClickException("the audit chain does not verify")

        say("Done. Look around:")
        say(f"    export ANIMUS_URL={base} ANIMUS_TOKEN={admin_token}")
        say(
            '    curl -s -H "Authorization: Bearer $ANIMUS_TOKEN" '
            f"$ANIMUS_URL/api/v1/projects/{pid}/runs/{run['id']}"
        )
        say(
            '    curl -s -H "Authorization: Bearer $ANIMUS_TOKEN" '
            f"$ANIMUS_URL/api/v1/projects/{pid}/runs/{run['id']}/logs"
        )
        say(f"    viewer token (read-only): {viewer_token}")
        say(f"    logs of each process: {data_dir}/*.log")
        say(f"    ANIMUS_DATA_DIR={data_dir} .venv/bin/animus audit verify")
        if serve:
            say("Serving until Ctrl-C.")
            server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        processes.stop()
        registry.stop()
