"""Runs: creation with the production gate, planning into an immutable execution snapshot,
state changes reported by the Data Plane, cancel, rerun / retry / replay, and the
reproducibility verdict.

Nothing here starts a process: the control plane plans and records, the Data Plane executes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import peewee

from appliance import db
from appliance.audit import log as audit
from appliance.audit.actions import Action
from appliance.domain.code import BRANCH_LIMITATION, COMMIT_SHA
from appliance.domain.context import Context
from appliance.domain.policies import policy_digest
from appliance.domain.records import (
    Artifact,
    CodeRef,
    DataPlane,
    DatasetFile,
    DatasetVersion,
    EnvironmentLock,
    ExecutionSnapshot,
    PolicySnapshot,
    Project,
    Run,
    RunApproval,
    RunLogChunk,
    RunMetric,
    canonical_json,
    new_id,
    utc_now,
)
from appliance.errors import AnimusError, NotFound, ValidationFailed

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
#: States a Data Plane may report, and from which states.
_REPORTABLE = {
    "running": {"planned", "unknown", "reconciling", "running"},
    "succeeded": {"planned", "running", "unknown", "reconciling"},
    "failed": {"planned", "running", "unknown", "reconciling"},
    "canceled": {"planned", "running", "unknown", "reconciling"},
}
INPUT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
#: Where a pipeline step's Run records the upstream artifacts it consumes (parameters key).
PIPELINE_PARAMETER = "animus_pipeline"
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")

#: Checks that an image digest exists in the local registry: returns None or the problem.
DigestVerifier = Callable[[str], "str | None"]
#: Resolves a branch or tag of a repository to a commit SHA.
RefResolver = Callable[[str, str], str]


def _later(seconds: int) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def run_in(project: Project, run_id: str) -> Run:
    run = Run.get_or_none((Run.id == run_id) & (Run.project_id == project.id))
    if run is None:
        raise NotFound(f"no run {run_id!r} in this project")
    return run


def _foreign(field: str, what: str) -> AnimusError:
    return AnimusError(
        f"the {what} belongs to another project",
        code="cross_project_reference",
        details={"field": field},
    )


def _in_project(model, object_id: str, project: Project, field: str, what: str):
    found = model.get_or_none(model.id == object_id)
    if found is None:
        raise ValidationFailed(f"no {what} {object_id!r}", details={"field": field})
    if found.project_id != project.id:
        raise _foreign(field, what)
    return found


def change_state(ctx: Context, run: Run, state: str, **fields: Any) -> None:
    """Move ``run`` to ``state`` and record the event, in the caller's transaction."""
    previous = run.state
    run.state = state
    for name, value in fields.items():
        setattr(run, name, value)
    Run.update(state=state, **fields).where(Run.id == run.id).execute()
    audit.record(
        ctx,
        Action.RUN_STATE_CHANGED,
        project_id=run.project_id,
        object_type="run",
        object_id=run.id,
        payload={
            "from": previous,
            "to": state,
            **{k: v for k, v in fields.items() if k in ("exit_code", "reason")},
        },
    )


# --- creation ---------------------------------------------------------------------------------


def create_run(
    ctx: Context,
    project: Project,
    spec: dict,
    *,
    verify_digest: DigestVerifier,
    source: Run | None = None,
    source_kind: str | None = None,
) -> Run:
    """Record a Run after checking access-independent rules: references, policy, the gate.

    A production Run missing a commit SHA, a verifiable EnvironmentLock or explicit
    DatasetVersions is refused with every missing item listed. A non-production Run records
    the same gaps as its limitations.
    """
    code_ref = _in_project(CodeRef, spec["code_ref_id"], project, "code_ref_id", "code ref")
    lock = _in_project(
        EnvironmentLock,
        spec["environment_lock_id"],
        project,
        "environment_lock_id",
        "environment lock",
    )
    inputs = []
    names = set()
    for index, item in enumerate(spec.get("inputs", [])):
        version = _in_project(
            DatasetVersion,
            item["dataset_version_id"],
            project,
            f"inputs/{index}/dataset_version_id",
            "dataset version",
        )
        name = item.get("name") or f"input{index}"
        if not INPUT_NAME.match(name) or name in names:
            raise ValidationFailed(
                f"input name {name!r} must be unique, lowercase, 1-64 of a-z 0-9 _ -",
                details={"field": f"inputs/{index}/name"},
            )
        names.add(name)
        inputs.append({"name": name, "dataset_version_id": version.id, "digest": version.digest})
    policy = project.policy
    problems: list[dict] = []
    for name in spec.get("env", {}):
        if not ENV_NAME.match(name) or name.startswith("ANIMUS_"):
            problems.append(
                {"field": f"env/{name}", "problem": "must be UPPER_CASE and not start with ANIMUS_"}
            )
    for secret in spec.get("secrets", []):
        if secret not in policy["secret_grants"]:
            problems.append(
                {"field": "secrets", "problem": f"the project policy grants no secret {secret!r}"}
            )
    resources = {**policy["resources"], **(spec.get("resources") or {})}
    for key, limit in policy["resources"].items():
        if resources[key] > limit:
            problems.append(
                {
                    "field": f"resources/{key}",
                    "problem": f"{resources[key]} exceeds the policy limit {limit}",
                }
            )
    if problems:
        raise ValidationFailed("the run is not valid", details={"errors": problems})

    gaps = []
    if not code_ref.production_ready:
        gaps.append(BRANCH_LIMITATION)
    digest_problem = verify_digest(lock.image_digest)
    if digest_problem:
        gaps.append(f"environment lock {lock.id}: {digest_problem}")
    if not inputs:
        gaps.append("no explicit DatasetVersion inputs")
    production = bool(spec.get("production"))
    approvals = policy["required_approvals"] if production else 0
    if production and gaps:
        raise AnimusError(
            "a production run needs a commit SHA, a verified EnvironmentLock and explicit "
            "DatasetVersions",
            code="production_requirements_unmet",
            details={"missing": gaps},
        )
    with db.write_transaction():
        run = Run.create(
            id=new_id("run"),
            project_id=project.id,
            state="created" if approvals else "queued",
            production=production,
            code_ref_id=code_ref.id,
            environment_lock_id=lock.id,
            inputs=inputs,
            command=list(spec["command"]),
            parameters=spec.get("parameters", {}),
            env=spec.get("env", {}),
            secrets=list(spec.get("secrets", [])),
            resources=resources,
            limitations=gaps,
            source_run_id=source.id if source else None,
            source_kind=source_kind,
            created_by=ctx.principal.actor,
            queued_at=None if approvals else utc_now(),
        )
        audit.record(
            ctx,
            Action.RUN_CREATED,
            project_id=project.id,
            object_type="run",
            object_id=run.id,
            payload={
                "production": production,
                "code_ref_id": code_ref.id,
                "environment_lock_id": lock.id,
                "inputs": inputs,
                "command": run.command,
                "parameters": run.parameters,
                "secrets": run.secrets,
                "limitations": gaps,
                "source_run_id": run.source_run_id,
                "source_kind": source_kind,
                "required_approvals": approvals,
            },
        )
    return run


def approve_run(ctx: Context, run: Run, reason: str) -> Run:
    """Record one project admin's approval of a production run awaiting approvals.

    Four eyes: the run's creator cannot approve it, and each admin approves once. When the
    policy's ``required_approvals`` are reached, the run is queued for planning.
    """
    if not reason.strip():
        raise ValidationFailed("an approval needs a reason", details={"field": "reason"})
    with db.write_transaction():
        run = Run.get_by_id(run.id)
        if run.state != "created":
            raise AnimusError(
                f"the run is {run.state}, not awaiting approval", code="invalid_state"
            )
        if ctx.principal.actor == run.created_by:
            raise AnimusError("the run's creator cannot approve it", code="invalid_state")
        try:
            with db.database.atomic():
                RunApproval.create(run_id=run.id, approver=ctx.principal.actor, reason=reason)
        except peewee.IntegrityError:
            raise AnimusError("you have already approved this run", code="conflict") from None
        audit.record(
            ctx,
            Action.RUN_APPROVED,
            project_id=run.project_id,
            object_type="run",
            object_id=run.id,
            payload={"reason": reason},
        )
        required = Project.get_by_id(run.project_id).policy["required_approvals"]
        given = RunApproval.select().where(RunApproval.run_id == run.id).count()
        if given >= required:
            change_state(ctx, run, "queued", queued_at=utc_now())
    return run


def approvals_of(run: Run) -> list[dict]:
    return [
        {"approver": a.approver, "reason": a.reason, "at": a.created_at}
        for a in RunApproval.select()
        .where(RunApproval.run_id == run.id)
        .order_by(RunApproval.created_at)
    ]


def run_spec(run: Run) -> dict:
    """The request that would create ``run`` again (for rerun and retry)."""
    return {
        "code_ref_id": run.code_ref_id,
        "environment_lock_id": run.environment_lock_id,
        "inputs": [
            {"name": i["name"], "dataset_version_id": i["dataset_version_id"]} for i in run.inputs
        ],
        "command": run.command,
        "parameters": run.parameters,
        "env": run.env,
        "secrets": run.secrets,
        "resources": run.resources,
        "production": run.production,
    }


def follow_up(
    ctx: Context, project: Project, source: Run, kind: str, verify_digest: DigestVerifier
) -> Run:
    """A new Run linked to ``source``: ``rerun`` and ``retry`` re-plan, ``replay`` reuses the
    source's frozen execution snapshot."""
    if kind == "retry" and source.state != "failed":
        raise AnimusError("only a failed run can be retried", code="invalid_state")
    if kind == "replay" and source.snapshot_id is None:
        raise AnimusError(
            "the run was never planned: there is no snapshot to replay", code="invalid_state"
        )
    return create_run(
        ctx, project, run_spec(source), verify_digest=verify_digest, source=source, source_kind=kind
    )


def cancel_run(ctx: Context, run: Run) -> Run:
    """Cancel now if no Data Plane holds the run; otherwise ask the holder to stop it."""
    with db.write_transaction():
        run = Run.get_by_id(run.id)
        if run.state in TERMINAL:
            raise AnimusError(f"the run is already {run.state}", code="invalid_state")
        if run.data_plane_id is None:
            change_state(ctx, run, "canceled", reason="canceled", finished_at=utc_now())
        elif not run.cancel_requested:
            run.cancel_requested = True
            Run.update(cancel_requested=True).where(Run.id == run.id).execute()
            audit.record(
                ctx,
                Action.RUN_CANCEL_REQUESTED,
                project_id=run.project_id,
                object_type="run",
                object_id=run.id,
            )
    return run


# --- planning ---------------------------------------------------------------------------------


def plan_run(ctx: Context, run: Run, *, image_repository: str, resolve_ref: RefResolver) -> Run:
    """queued → planned: copy the policy, resolve refs, freeze the execution snapshot."""
    project = Project.get_by_id(run.project_id)
    code_ref = CodeRef.get_by_id(run.code_ref_id)
    lock = EnvironmentLock.get_by_id(run.environment_lock_id)
    source_snapshot = None
    if run.source_kind == "replay":
        source = Run.get_by_id(run.source_run_id)
        source_snapshot = ExecutionSnapshot.get_by_id(source.snapshot_id).snapshot
    if source_snapshot is not None:
        commit = source_snapshot["code"]["commit_sha"]
    elif code_ref.commit_sha:
        commit = code_ref.commit_sha
    else:
        commit = resolve_ref(code_ref.repo_url, code_ref.ref)
        if not COMMIT_SHA.match(commit):
            raise ValidationFailed(f"{code_ref.ref!r} did not resolve to a commit")
    inputs = []
    for item in run.inputs:
        files = [
            {"path": f.path, "sha256": f.sha256, "size": f.size}
            for f in DatasetFile.select()
            .where(DatasetFile.version_id == item["dataset_version_id"])
            .order_by(DatasetFile.path)
        ]
        inputs.append({**item, "files": files})
    inputs += _artifact_inputs(run, {i["name"] for i in inputs})
    with db.write_transaction():
        policy = source_snapshot["policy"] if source_snapshot else project.policy
        snapshot_record = PolicySnapshot.create(
            id=new_id("pol"),
            project_id=project.id,
            policy=policy,
            digest=policy_digest(policy),
            created_by=ctx.principal.actor,
        )
        audit.record(
            ctx,
            Action.POLICY_SNAPSHOT_CREATED,
            project_id=project.id,
            object_type="policy_snapshot",
            object_id=snapshot_record.id,
            payload={"digest": snapshot_record.digest, "run_id": run.id},
        )
        snapshot = {
            "run_id": run.id,
            "project_id": project.id,
            "image": f"{image_repository}@{lock.image_digest}",
            "image_digest": lock.image_digest,
            "environment_lock_id": lock.id,
            "command": run.command,
            "parameters": run.parameters,
            "env": run.env,
            "secrets": run.secrets,
            "resources": run.resources,
            "network": {"egress": list(policy["egress"]["allow"])},
            "inputs": inputs,
            "code": {"repo_url": code_ref.repo_url, "commit_sha": commit, "path": code_ref.path},
            "policy": policy,
            "policy_snapshot_id": snapshot_record.id,
        }
        if source_snapshot is not None:
            # A replay runs exactly what its source ran; only the run id is its own.
            snapshot = {
                **source_snapshot,
                "run_id": run.id,
                "policy_snapshot_id": snapshot_record.id,
            }
        text = canonical_json(snapshot)
        frozen = ExecutionSnapshot.create(
            id=new_id("snap"),
            project_id=project.id,
            run_id=run.id,
            snapshot=snapshot,
            digest="sha256:" + hashlib.sha256(text.encode()).hexdigest(),
        )
        change_state(
            ctx,
            run,
            "planned",
            planned_at=utc_now(),
            policy_snapshot_id=snapshot_record.id,
            snapshot_id=frozen.id,
        )
    return run


def _artifact_inputs(run: Run, taken: set[str]) -> list[dict]:
    """Upstream artifacts a pipeline step consumes, as snapshot inputs pinned by digest.

    Path and digest come from the Artifact record itself, never from the request, and the
    artifact must belong to the run's project.
    """
    wanted = (run.parameters.get(PIPELINE_PARAMETER) or {}).get("artifact_inputs") or []
    pinned = []
    for item in wanted:
        artifact = Artifact.get_or_none(Artifact.id == item.get("artifact_id"))
        if artifact is None or artifact.project_id != run.project_id:
            raise ValidationFailed(f"artifact input {item.get('name')!r} is not in this project")
        name = item.get("name")
        if not isinstance(name, str) or not INPUT_NAME.match(name) or name in taken:
            raise ValidationFailed(f"artifact input name {name!r} is not a unique input name")
        taken.add(name)
        pinned.append(
            {
                "name": name,
                "artifact_id": artifact.id,
                "source_run_id": artifact.run_id,
                "digest": "sha256:" + artifact.sha256,
                "files": [
                    {"path": artifact.path, "sha256": artifact.sha256, "size": artifact.size}
                ],
            }
        )
    return pinned


# --- the Data Plane contract --------------------------------------------------------------


def lease_runs(ctx: Context, plane: DataPlane, capacity: int, lease_seconds: int) -> list[Run]:
    """Give ``plane`` up to ``capacity`` planned runs, counting those it already holds.

    Idempotent: the answer always includes every run the plane holds (with its snapshot), so
    a plane that asks again, or restarts, gets the same runs, never a second copy.
    """
    with db.write_transaction():
        held = list(
            Run.select().where(
                (Run.data_plane_id == plane.id)
                & Run.state.in_(["planned", "running", "unknown", "reconciling"])
            )
        )
        free = max(0, capacity - len(held))
        fresh = (
            list(
                Run.select()
                .where((Run.state == "planned") & Run.data_plane_id.is_null())
                .order_by(Run.planned_at, Run.id)
                .limit(free)
            )
            if free
            else []
        )
        expires = _later(lease_seconds)
        for run in fresh:
            Run.update(data_plane_id=plane.id, lease_expires_at=expires).where(
                (Run.id == run.id) & Run.data_plane_id.is_null()
            ).execute()
        DataPlane.update(last_seen_at=utc_now()).where(DataPlane.id == plane.id).execute()
    return held + fresh


def lease_available(plane: DataPlane) -> bool:
    """Whether a lease call would hand ``plane`` a planned run (a cheap read, no lock)."""
    return (
        Run.select()
        .where(
            (Run.state == "planned")
            & (Run.data_plane_id.is_null() | (Run.data_plane_id == plane.id))
            & Run.started_at.is_null()
        )
        .exists()
    )


def held_run(plane: DataPlane, run_id: str) -> Run:
    run = Run.get_or_none(Run.id == run_id)
    if run is None or run.data_plane_id != plane.id:
        raise AnimusError("this Data Plane does not hold the run", code="lease_lost")
    return run


def heartbeat(ctx: Context, plane: DataPlane, run_id: str, lease_seconds: int) -> Run:
    with db.write_transaction():
        run = held_run(plane, run_id)
        if run.state == "unknown":
            change_state(ctx, run, "reconciling")
        Run.update(lease_expires_at=_later(lease_seconds)).where(Run.id == run.id).execute()
        DataPlane.update(last_seen_at=utc_now()).where(DataPlane.id == plane.id).execute()
    return run


def report_state(
    ctx: Context,
    plane: DataPlane,
    run_id: str,
    state: str,
    exit_code: int | None,
    reason: str | None,
    lease_seconds: int,
) -> Run:
    """Record what the Data Plane says; repeating the same report changes nothing."""
    with db.write_transaction():
        run = held_run(plane, run_id)
        if run.state == state:
            return run
        if run.state in TERMINAL or run.state not in _REPORTABLE[state]:
            raise AnimusError(f"a {run.state} run cannot become {state}", code="invalid_state")
        fields: dict[str, Any] = {"lease_expires_at": _later(lease_seconds)}
        if state == "running":
            fields["started_at"] = run.started_at or utc_now()
        else:
            fields.update(
                exit_code=exit_code,
                reason=reason,
                finished_at=utc_now(),
                started_at=run.started_at or utc_now(),
            )
        change_state(ctx, run, state, **fields)
    return run


def settle_forgotten_runs(ctx: Context, plane: DataPlane, known: set[str]) -> list[Run]:
    """After a Data Plane restarts: runs it holds but no longer knows.

    Never started: back to the queue of planned runs (nothing ran, so nothing is duplicated).
    Started: failed with reason ``lost`` (the container is gone with its outcome).
    """
    changed = []
    with db.write_transaction():
        for run in Run.select().where(
            (Run.data_plane_id == plane.id)
            & Run.state.in_(["planned", "running", "unknown", "reconciling"])
        ):
            if run.id in known:
                continue
            if run.started_at is None and run.state == "planned":
                Run.update(data_plane_id=None, lease_expires_at=None).where(
                    Run.id == run.id
                ).execute()
            elif run.started_at is None:
                change_state(ctx, run, "planned", data_plane_id=None, lease_expires_at=None)
            else:
                change_state(ctx, run, "failed", reason="lost", finished_at=utc_now())
            changed.append(run)
    return changed


def expire_leases(ctx: Context) -> list[Run]:
    """Runs whose Data Plane stopped heartbeating become ``unknown`` (never stuck ``running``)."""
    now = utc_now()
    changed = []
    with db.write_transaction():
        for run in Run.select().where(
            Run.state.in_(["planned", "running", "reconciling"])
            & Run.data_plane_id.is_null(False)
            & (Run.lease_expires_at < now)
        ):
            change_state(ctx, run, "unknown", reason="lease expired")
            changed.append(run)
    return changed


def append_log(run: Run, offset: int, data: str) -> int:
    """Append log text at ``offset``; a repeated or overlapping chunk is not stored twice."""
    with db.write_transaction():
        size = Run.select(Run.log_size).where(Run.id == run.id).scalar()
        if offset > size:
            raise AnimusError(
                f"log offset {offset} is past the end ({size})",
                code="log_gap",
                details={"size": size},
            )
        tail = data[size - offset :]
        if tail:
            RunLogChunk.create(run_id=run.id, offset=size, data=tail)
            size += len(tail)
            Run.update(log_size=size).where(Run.id == run.id).execute()
    return size


def read_log(run: Run, offset: int = 0) -> str:
    chunks = (
        RunLogChunk.select()
        .where(
            (RunLogChunk.run_id == run.id)
            & (RunLogChunk.offset + peewee.fn.LENGTH(RunLogChunk.data) > offset)
        )
        .order_by(RunLogChunk.offset)
    )
    text = "".join(c.data for c in chunks)
    first = next(iter(chunks), None)
    return text[offset - first.offset :] if first is not None else ""


def add_metrics(run: Run, records: list[dict]) -> int:
    """Store metric records by their sequence number; repeats are ignored."""
    with db.write_transaction():
        for record in records:
            RunMetric.insert(
                run_id=run.id,
                seq=record["seq"],
                name=record["name"],
                value=float(record["value"]),
                step=record.get("step"),
                at=record.get("at"),
            ).on_conflict_ignore().execute()
    return RunMetric.select().where(RunMetric.run_id == run.id).count()


def record_artifact(
    ctx: Context, run: Run, path: str, sha256: str, size: int, promote: Callable[[], None]
) -> Artifact:
    """Record an output file of ``run``; the same path with the same content is a repeat."""
    with db.write_transaction():
        existing = Artifact.get_or_none((Artifact.run_id == run.id) & (Artifact.path == path))
        if existing is not None:
            if existing.sha256 != sha256:
                raise AnimusError(
                    f"artifact {path!r} was already recorded with other content", code="conflict"
                )
            return existing
        artifact = Artifact.create(
            id=new_id("art"),
            project_id=run.project_id,
            run_id=run.id,
            path=path,
            sha256=sha256,
            size=size,
        )
        audit.record(
            ctx,
            Action.ARTIFACT_RECORDED,
            project_id=run.project_id,
            object_type="artifact",
            object_id=artifact.id,
            payload={"run_id": run.id, "path": path, "sha256": sha256, "size": size},
        )
        promote()
    return artifact


# --- reproducibility --------------------------------------------------------------------------


def reproducibility(run: Run) -> dict | None:
    """For a finished replay: whether its artifacts have the same digests as its source's."""
    if run.source_kind != "replay" or run.state not in TERMINAL:
        return None
    source = Run.get_by_id(run.source_run_id)

    def digests(r: Run) -> dict[str, str]:
        return {a.path: a.sha256 for a in Artifact.select().where(Artifact.run_id == r.id)}

    mine, theirs = digests(run), digests(source)
    differences = []
    for path in sorted(set(mine) | set(theirs)):
        if mine.get(path) != theirs.get(path):
            differences.append(
                {"path": path, "source_sha256": theirs.get(path), "replay_sha256": mine.get(path)}
            )
    if run.state != "succeeded" or source.state != "succeeded":
        return {
            "source_run_id": source.id,
            "reproduced": "not_comparable",
            "differences": differences,
            "reason": f"source {source.state}, replay {run.state}",
        }
    return {
        "source_run_id": source.id,
        "reproduced": "identical" if not differences else "different",
        "differences": differences,
    }
