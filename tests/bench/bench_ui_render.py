"""Benchmark: server-side render time of the web UI's pages with 10,000 runs in a project.

Builds a project the ordinary way (the domain's use cases, each audited: a dataset version,
a code ref, an environment lock, one finished run with 500 metric points, a log and
artifacts), then adds the other runs as rows in bulk — a fixture, not a use case, so those
rows have no audit events of their own. Each page is then requested through the WSGI app
(in process, with a real session cookie) and timed from request to complete body.

Prints the median and p90 per page (target: every median under 200 ms).

Run: python tests/bench/bench_ui_render.py [--runs 10000] [--rounds 30]
     [--database-url postgresql://…/EMPTY_DB]   (default: SQLite in a temporary directory)
The machine is shared and noisy; compare the figures measured in one run.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from appliance import db  # noqa: E402
from appliance.app import create_app  # noqa: E402
from appliance.auth import identities, sessions  # noqa: E402
from appliance.config import Config  # noqa: E402
from appliance.demo import tar_of  # noqa: E402
from appliance.domain import code, datasets, environments, projects, runs  # noqa: E402
from appliance.domain.context import SYSTEM, Context  # noqa: E402
from appliance.domain.records import Run, new_id, utc_now  # noqa: E402
from appliance.storage.uploads import UploadLimits, read_tar_stream  # noqa: E402

STATES = ("succeeded", "failed", "canceled", "queued", "running")


def build(app, count: int) -> dict:
    """The project, the finished run, and ``count - 1`` more runs inserted in bulk."""
    system = Context(SYSTEM, "bench")
    user = identities.create_user(system, "bench", None)
    ctx = Context(identities.principal_for_user(user), "bench")
    project = projects.create_project(ctx, "bench")
    dataset = datasets.create_dataset(ctx, project, "rows")
    blobs = app.extensions["animus.blobs"]
    with blobs.stage() as staged:
        files = read_tar_stream(
            io.BytesIO(tar_of({f"part-{i:03d}.csv": b"a,b\n%d,2\n" % i for i in range(200)})),
            staged,
            UploadLimits(max_total_bytes=1 << 30, max_files=1000),
        )
        version = datasets.create_version(ctx, project, dataset, files, staged, blobs)
    ref = code.create_code_ref(ctx, project, "https://git.example/r.git", commit_sha="a" * 40)
    env = environments.create_environment(ctx, project, "base", "runner", [])
    lock = environments.create_lock(ctx, project, env.id, "sha256:" + "b" * 64, [])
    spec = {
        "code_ref_id": ref.id,
        "environment_lock_id": lock.id,
        "inputs": [{"name": "train", "dataset_version_id": version.id}],
        "command": ["python3", "train.py"],
    }
    finished = runs.create_run(ctx, project, spec, verify_digest=lambda _d: None)
    runs.plan_run(ctx, finished, image_repository="bench/runner", resolve_ref=lambda *_: "")
    runs.append_log(
        finished, 0, "".join(f"epoch {i} loss {1 / (i + 1):.4f}\n" for i in range(2000))
    )
    runs.add_metrics(
        finished,
        [
            {"seq": i, "name": "loss" if i % 2 else "auc", "value": 1 / (i + 1), "step": i // 2}
            for i in range(500)
        ],
    )
    template = Run.get_by_id(finished.id)
    rows = []
    for number in range(count - 1):
        rows.append(
            {
                "id": new_id("run"),
                "project_id": project.id,
                "state": STATES[number % len(STATES)],
                "production": number % 3 == 0,
                "code_ref_id": ref.id,
                "environment_lock_id": lock.id,
                "inputs": template.inputs,
                "command": ["python3", "train.py", f"--seed={number}"],
                "parameters": {"seed": number},
                "env": {},
                "secrets": [],
                "resources": template.resources,
                "limitations": [],
                "created_at": utc_now(),
                "created_by": "user:bench",
                "queued_at": utc_now(),
            }
        )
    started = time.perf_counter()
    with db.write_transaction():
        for start in range(0, len(rows), 500):
            Run.insert_many(rows[start : start + 500]).execute()
    print(f"inserted {len(rows)} runs in {time.perf_counter() - started:.1f} s")
    return {"user": user, "project": project, "version": version, "run": finished}


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="animus-bench-ui-") as tmp:
        config = Config.from_env(
            {}, data_dir=tmp, database_url=args.database_url, blob_fsync="0", log_level="WARNING"
        )
        app = create_app(config)
        db.database.connect(reuse_if_open=True)
        db.upgrade(log=lambda _line: None)
        world = build(app, args.runs)
        policy = sessions.SessionPolicy(3600, 3600, 5)
        _, secret = sessions.start_session(Context(SYSTEM, "bench"), world["user"], policy)
        db.database.close()
        client = app.test_client()
        client.set_cookie("animus_session", secret, path="/ui")
        pid, rid = world["project"].id, world["run"].id
        middle = (
            Run.select(Run.id).where(Run.project_id == pid).order_by(Run.id).offset(args.runs // 2)
        )
        db.database.connect(reuse_if_open=True)
        cursor_id = middle.scalar()
        db.database.close()
        import base64

        cursor = base64.urlsafe_b64encode(cursor_id.encode()).decode().rstrip("=")
        pages = {
            "projects list": "/ui/projects",
            "project page": f"/ui/projects/{pid}",
            "runs list": f"/ui/projects/{pid}/runs",
            "runs list, state filter": f"/ui/projects/{pid}/runs?state=failed",
            "runs list, production filter": f"/ui/projects/{pid}/runs?kind=production",
            "runs list, page in the middle": f"/ui/projects/{pid}/runs?before={cursor}",
            "run page (500 metrics, log)": f"/ui/projects/{pid}/runs/{rid}",
            "dataset version (200 files)": f"/ui/projects/{pid}/dataset-versions/{world['version'].id}",
            "datasets": f"/ui/projects/{pid}/datasets",
            "models": f"/ui/projects/{pid}/models",
            "members": f"/ui/projects/{pid}/members",
        }
        results = {}
        for name, path in pages.items():
            first = client.get(path)
            if first.status_code != 200:
                print(f"{name}: HTTP {first.status_code}", file=sys.stderr)
                return 1
            samples = []
            for _ in range(args.rounds):
                started = time.perf_counter()
                response = client.get(path)
                response.get_data()
                samples.append(time.perf_counter() - started)
            results[name] = samples
        backend = "postgresql" if args.database_url else "sqlite"
        print(f"\n{args.runs} runs in one project, {backend}, {args.rounds} rounds per page")
        print(f"{'page':34} {'median ms':>10} {'p90 ms':>8}")
        for name, samples in results.items():
            p90 = sorted(samples)[int(len(samples) * 0.9) - 1] * 1000
            print(f"{name:34} {median_ms(samples):10.1f} {p90:8.1f}")
        worst = max(median_ms(s) for s in results.values())
        verdict = "OK" if worst < 200 else "OVER TARGET"
        print(f"\nslowest median {worst:.1f} ms (target < 200 ms): {verdict}")
        return 0 if worst < 200 else 1


if __name__ == "__main__":
    sys.exit(main())
