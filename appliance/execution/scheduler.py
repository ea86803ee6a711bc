"""``animus scheduler``: plans queued Runs and moves Runs whose lease lapsed to ``unknown``.

It is its own process and keeps no state of its own: everything is in the database, so a
scheduler killed at any moment resumes where it stopped when it starts again.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time

from appliance import db
from appliance.config import Config
from appliance.domain import pipelines, runs
from appliance.domain.context import SYSTEM, Context
from appliance.domain.records import Run, utc_now
from appliance.errors import AnimusError
from appliance.execution.registry_check import digest_verifier, image_repository

log = logging.getLogger("appliance.scheduler")


def resolve_git_ref(repo_url: str, ref: str) -> str:
    """The commit a branch or tag points to now (``git ls-remote``; no code is fetched or run)."""
    result = subprocess.run(
        [
            "git",
            "ls-remote",
            "--",
            repo_url,
            f"refs/heads/{ref}",
            f"refs/tags/{ref}^{{}}",
            f"refs/tags/{ref}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0 or not result.stdout.strip():
        raise AnimusError(f"cannot resolve {ref!r} in {repo_url}", code="validation_failed")
    lines = [line.split("\t") for line in result.stdout.strip().splitlines()]
    peeled = [sha for sha, name in lines if name.endswith("^{}")]
    return (peeled or [lines[0][0]])[0]


def tick(config: Config, *, batch: int = 50) -> dict[str, int]:
    """One pass: advance pipelines, plan queued runs, expire lapsed leases. Returns what it did."""
    ctx = Context(SYSTEM, f"scheduler-{int(time.time())}")
    repository = image_repository(config.registry_url, config.environment_repository)
    # First, so the Runs of steps that became ready are planned in this same pass.
    steps = pipelines.advance_all(
        ctx, digest_verifier(config.registry_url, config.environment_repository)
    )
    planned = failed = 0
    for run in Run.select().where(Run.state == "queued").order_by(Run.id).limit(batch):
        try:
            runs.plan_run(ctx, run, image_repository=repository, resolve_ref=resolve_git_ref)
            planned += 1
        except AnimusError as exc:
            with db.write_transaction():
                fresh = Run.get_by_id(run.id)
                if fresh.state == "queued":
                    runs.change_state(
                        ctx,
                        fresh,
                        "failed",
                        reason=f"planning: {exc.message}",
                        finished_at=utc_now(),
                    )
            failed += 1
    expired = len(runs.expire_leases(ctx))
    return {
        "pipeline_steps_changed": steps,
        "planned": planned,
        "planning_failed": failed,
        "leases_expired": expired,
    }


def run_forever(
    config: Config, *, interval: float = 0.05, stop: threading.Event | None = None
) -> None:
    stop = stop or threading.Event()
    db.bind(db.open_database(config.effective_database_url))
    log.info("scheduler started")
    while not stop.is_set():
        try:
            db.database.connect(reuse_if_open=True)
            done = tick(config)
            if any(done.values()):
                log.info("scheduler tick", extra={"fields": done})
        except Exception:  # one bad tick must not end the scheduler
            log.exception("scheduler tick failed")
        finally:
            if not db.database.is_closed():
                db.database.close()
        stop.wait(interval)
