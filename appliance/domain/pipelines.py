"""Pipelines: a JSON DAG of steps, validated as a whole before anything starts, whose steps
run as ordinary Runs.

A pipeline spec holds no code: each step names a CodeRef, an EnvironmentLock, its inputs
(DatasetVersions, or an artifact of an upstream step), a command and resources. Every problem
of a spec is reported at once. A PipelineRun creates a Run (through ``runs.create_run``, so
the production gate and the project policy apply) for every step whose dependencies have
succeeded; a failed step stops exactly the steps that depend on it. Artifacts flow downstream
by digest: the consuming Run records the upstream Run, path and sha256 in its parameters, and
so in its frozen execution snapshot.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import jsonschema
import peewee

from appliance import db
from appliance.audit import log as audit
from appliance.audit.actions import Action
from appliance.domain import runs
from appliance.domain.context import Context
from appliance.domain.records import (
    Artifact,
    CodeRef,
    DatasetVersion,
    EnvironmentLock,
    Pipeline,
    PipelineRun,
    PipelineStep,
    Project,
    Run,
    canonical_json,
    new_id,
    utc_now,
)
from appliance.errors import AnimusError, NotFound, ValidationFailed

PIPELINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
STEP_NAME = r"^[a-z][a-z0-9_-]{0,63}$"
#: The parameter under which a step's Run records where its artifact inputs came from.
PIPELINE_PARAMETER = "animus_pipeline"
STEP_STATES = ("pending", "running", "succeeded", "failed", "stopped")
_FINISHED_STEP = frozenset({"succeeded", "failed", "stopped"})

_ID = {"type": "string", "minLength": 1, "maxLength": 64}
_INPUT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": STEP_NAME},
        "dataset_version_id": _ID,
        "from_step": {"type": "string", "maxLength": 64},
        "artifact": {"type": "string", "minLength": 1, "maxLength": 1024},
    },
}
_STEP = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "code_ref_id", "environment_lock_id", "command"],
    "properties": {
        "name": {"type": "string", "pattern": STEP_NAME},
        "code_ref_id": _ID,
        "environment_lock_id": _ID,
        "command": {
            "type": "array",
            "minItems": 1,
            "maxItems": 256,
            "items": {"type": "string", "maxLength": 4096},
        },
        "inputs": {"type": "array", "maxItems": 64, "items": _INPUT},
        "depends_on": {
            "type": "array",
            "maxItems": 100,
            "items": {"type": "string", "maxLength": 64},
        },
        "parameters": {"type": "object", "maxProperties": 256},
        "env": {
            "type": "object",
            "maxProperties": 256,
            "additionalProperties": {"type": "string", "maxLength": 4096},
        },
        "secrets": {"type": "array", "maxItems": 64, "items": {"type": "string", "maxLength": 200}},
        "resources": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "cpu": {"type": "number", "exclusiveMinimum": 0},
                "memory_mb": {"type": "integer", "minimum": 16},
                "pids": {"type": "integer", "minimum": 8},
                "timeout_seconds": {"type": "integer", "minimum": 1},
            },
        },
        "production": {"type": "boolean"},
    },
}
#: The JSON schema of a pipeline spec (types only; references and the graph are checked after).
SPEC_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["steps"],
    "properties": {"steps": {"type": "array", "minItems": 1, "maxItems": 100, "items": _STEP}},
}


# --- validation -------------------------------------------------------------------------------


def dependencies(step: dict) -> list[str]:
    """The steps ``step`` waits for: its ``depends_on`` and the producers of its artifacts."""
    declared = step.get("depends_on", [])
    names = [n for n in declared if isinstance(n, str)] if isinstance(declared, list) else []
    inputs = step.get("inputs", [])
    for item in inputs if isinstance(inputs, list) else []:
        producer = item.get("from_step") if isinstance(item, dict) else None
        if isinstance(producer, str) and producer not in names:
            names.append(producer)
    return names


def _problem(field: str, problem: str, code: str = "validation_failed") -> dict:
    return {"field": field, "problem": problem, "code": code}


def _check_reference(model, object_id: str, project: Project, field: str, what: str):
    found = model.get_or_none(model.id == object_id)
    if found is None:
        return _problem(field, f"no {what} {object_id!r}", "unknown_reference")
    if found.project_id != project.id:
        return _problem(field, f"the {what} belongs to another project", "cross_project_reference")
    return None


def _cycle(steps: list[dict]) -> list[str] | None:
    """One cycle of the graph as a path of step names (first name repeated last), or None."""
    graph = {s["name"]: dependencies(s) for s in steps}
    colour: dict[str, int] = {}
    trail: list[str] = []

    def visit(name: str) -> list[str] | None:
        colour[name] = 1
        trail.append(name)
        for dep in graph.get(name, []):
            if dep not in graph:
                continue
            if colour.get(dep) == 1:
                return [*trail[trail.index(dep) :], dep]
            if dep not in colour and (found := visit(dep)):
                return found
        colour[name] = 2
        trail.pop()
        return None

    for name in graph:
        if name not in colour and (found := visit(name)):
            return list(reversed(found))
    return None


def spec_problems(project: Project, spec: object) -> list[dict]:
    """Every problem of ``spec``: types, names, references, the graph. Empty when valid."""
    problems = [
        _problem("/".join(map(str, ["spec", *e.absolute_path])), e.message, "invalid_type")
        for e in sorted(
            jsonschema.Draft202012Validator(SPEC_SCHEMA).iter_errors(spec),
            key=lambda e: [str(p) for p in e.absolute_path],
        )
    ]
    if not isinstance(spec, dict) or not isinstance(spec.get("steps"), list):
        return problems
    steps = [s for s in spec["steps"] if isinstance(s, dict) and isinstance(s.get("name"), str)]
    names = [s["name"] for s in steps]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(_problem("spec/steps", f"step name {name!r} is used more than once"))
    known = set(names)
    for index, step in enumerate(spec["steps"]):
        if not isinstance(step, dict):
            continue
        at = f"spec/steps/{index}"
        for key, model, what in (
            ("code_ref_id", CodeRef, "code ref"),
            ("environment_lock_id", EnvironmentLock, "environment lock"),
        ):
            if isinstance(step.get(key), str):
                found = _check_reference(model, step[key], project, f"{at}/{key}", what)
                problems += [found] if found else []
        if PIPELINE_PARAMETER in (step.get("parameters") or {}):
            problems.append(
                _problem(f"{at}/parameters", f"{PIPELINE_PARAMETER!r} is reserved for the pipeline")
            )
        for name in step.get("depends_on", []) if isinstance(step.get("depends_on"), list) else []:
            if isinstance(name, str) and name not in known:
                problems.append(
                    _problem(f"{at}/depends_on", f"no step {name!r}", "unknown_reference")
                )
        inputs = step.get("inputs", [])
        input_names: list[str] = []
        for position, item in enumerate(inputs if isinstance(inputs, list) else []):
            if not isinstance(item, dict):
                continue
            where = f"{at}/inputs/{position}"
            input_names.append(item.get("name"))
            from_dataset = "dataset_version_id" in item
            from_step = "from_step" in item or "artifact" in item
            if from_dataset == from_step:
                problems.append(
                    _problem(where, "give either dataset_version_id, or from_step with artifact")
                )
                continue
            if from_dataset and isinstance(item["dataset_version_id"], str):
                found = _check_reference(
                    DatasetVersion,
                    item["dataset_version_id"],
                    project,
                    f"{where}/dataset_version_id",
                    "dataset version",
                )
                problems += [found] if found else []
            if from_step:
                if not ("from_step" in item and "artifact" in item):
                    problems.append(_problem(where, "from_step and artifact go together"))
                elif item["from_step"] == step.get("name"):
                    problems.append(
                        _problem(f"{where}/from_step", "a step cannot consume its own artifact")
                    )
                elif isinstance(item["from_step"], str) and item["from_step"] not in known:
                    problems.append(
                        _problem(
                            f"{where}/from_step",
                            f"no step {item['from_step']!r}",
                            "unknown_reference",
                        )
                    )
                path = item.get("artifact")
                if isinstance(path, str) and (
                    path.startswith("/") or ".." in path.split("/") or "\\" in path
                ):
                    problems.append(
                        _problem(f"{where}/artifact", "must be a relative path inside the run")
                    )
        texts = [n for n in input_names if isinstance(n, str)]
        for name in sorted({n for n in texts if texts.count(n) > 1}):
            problems.append(_problem(f"{at}/inputs", f"input name {name!r} is used more than once"))
    cycle = _cycle(steps)
    if cycle:
        problems.append(
            _problem("spec/steps", "the steps form a cycle: " + " → ".join(cycle), "cycle")
        )
    return problems


def _refuse(problems: list[dict], message: str) -> None:
    if problems:
        raise ValidationFailed(message, details={"errors": problems})


# --- pipelines --------------------------------------------------------------------------------


def pipeline_in(project: Project, pipeline_id: str) -> Pipeline:
    found = Pipeline.get_or_none((Pipeline.id == pipeline_id) & (Pipeline.project_id == project.id))
    if found is None:
        raise NotFound(f"no pipeline {pipeline_id!r} in this project")
    return found


def pipeline_run_in(project: Project, pipeline_run_id: str) -> PipelineRun:
    found = PipelineRun.get_or_none(
        (PipelineRun.id == pipeline_run_id) & (PipelineRun.project_id == project.id)
    )
    if found is None:
        raise NotFound(f"no pipeline run {pipeline_run_id!r} in this project")
    return found


def create_pipeline(ctx: Context, project: Project, name: str, spec: object) -> Pipeline:
    """Store a validated, immutable pipeline spec; every problem of the spec is listed at once."""
    problems = spec_problems(project, spec)
    if not PIPELINE_NAME.match(name):
        problems.insert(
            0, _problem("name", "1-100 characters: letters, digits, '.', '_' or '-'", "invalid")
        )
    _refuse(problems, "the pipeline is not valid")
    digest = "sha256:" + hashlib.sha256(canonical_json(spec).encode()).hexdigest()
    with db.write_transaction():
        try:
            with db.database.atomic():
                pipeline = Pipeline.create(
                    id=new_id("pipe"),
                    project_id=project.id,
                    name=name,
                    spec=spec,
                    digest=digest,
                    created_by=ctx.principal.actor,
                )
        except peewee.IntegrityError:
            raise AnimusError(
                f"a pipeline named {name!r} exists in this project", code="already_exists"
            ) from None
        audit.record(
            ctx,
            Action.PIPELINE_CREATED,
            project_id=project.id,
            object_type="pipeline",
            object_id=pipeline.id,
            payload={"name": name, "digest": digest, "steps": [s["name"] for s in spec["steps"]]},
        )
    return pipeline


# --- pipeline runs ----------------------------------------------------------------------------


def steps_of(pipeline_run: PipelineRun) -> list[PipelineStep]:
    return list(
        PipelineStep.select()
        .where(PipelineStep.pipeline_run_id == pipeline_run.id)
        .order_by(PipelineStep.position)
    )


def _artifact_inputs(step: dict, run_of: dict[str, str]) -> tuple[list[dict], list[str]]:
    """The upstream artifacts ``step`` consumes, pinned by digest, and what is missing."""
    pinned, missing = [], []
    for item in step.get("inputs", []):
        if "from_step" not in item:
            continue
        run_id = run_of[item["from_step"]]
        artifact = Artifact.get_or_none(
            (Artifact.run_id == run_id) & (Artifact.path == item["artifact"])
        )
        if artifact is None:
            missing.append(f"step {item['from_step']!r} produced no artifact {item['artifact']!r}")
            continue
        pinned.append(
            {
                "name": item["name"],
                "from_step": item["from_step"],
                "run_id": run_id,
                "artifact_id": artifact.id,
                "path": artifact.path,
                "sha256": artifact.sha256,
                "size": artifact.size,
            }
        )
    return pinned, missing


def _input_digest(step: dict, pinned: list[dict]) -> str:
    """What a step's result depends on: its definition and the digests of its artifact inputs."""
    key = {
        "step": step,
        "artifacts": [{k: p[k] for k in ("name", "from_step", "path", "sha256")} for p in pinned],
    }
    return "sha256:" + hashlib.sha256(canonical_json(key).encode()).hexdigest()


def _run_request(pipeline_run: PipelineRun, step: dict, pinned: list[dict]) -> dict:
    """The ``runs.create_run`` request for ``step``, recording its artifact inputs by digest."""
    request = {
        key: step[key]
        for key in ("code_ref_id", "environment_lock_id", "command", "env", "secrets", "resources")
        if key in step
    }
    request["production"] = bool(step.get("production"))
    request["inputs"] = [
        {"name": i["name"], "dataset_version_id": i["dataset_version_id"]}
        for i in step.get("inputs", [])
        if "dataset_version_id" in i
    ]
    request["parameters"] = {
        **step.get("parameters", {}),
        PIPELINE_PARAMETER: {
            "pipeline_run_id": pipeline_run.id,
            "pipeline_id": pipeline_run.pipeline_id,
            "step": step["name"],
            "artifact_inputs": pinned,
        },
    }
    return request


def _set_step(ctx: Context, pipeline_run: PipelineRun, step: PipelineStep, state: str, **fields):
    previous = step.state
    step.state = state
    PipelineStep.update(state=state, updated_at=utc_now(), **fields).where(
        (PipelineStep.pipeline_run_id == step.pipeline_run_id) & (PipelineStep.name == step.name)
    ).execute()
    for name, value in fields.items():
        setattr(step, name, value)
    audit.record(
        ctx,
        Action.PIPELINE_STEP_STATE_CHANGED,
        project_id=pipeline_run.project_id,
        object_type="pipeline_run",
        object_id=pipeline_run.id,
        payload={"step": step.name, "from": previous, "to": state, **fields},
    )


class _Undo(Exception):
    """Rolls a trial back to its savepoint."""


def _preflight(
    ctx: Context,
    project: Project,
    pipeline_run: PipelineRun,
    steps: Iterable[dict],
    verify_digest: runs.DigestVerifier,
) -> None:
    """Try every step's Run request (gate, policy, references) and undo it: list every refusal.

    Artifact inputs are not known yet, so they are left out of the trial; everything else the
    Run will be checked against is the same.
    """
    problems = []
    required = project.policy["required_approvals"]
    for index, step in enumerate(steps):
        if step.get("production") and required:
            problems.append(
                _problem(
                    f"spec/steps/{index}",
                    f"step {step['name']!r}: production steps that need approvals cannot run "
                    "in a pipeline yet (the policy requires approvals)",
                    "approval_required",
                )
            )
            continue
        try:
            with db.database.atomic():
                try:
                    runs.create_run(
                        ctx,
                        project,
                        _run_request(pipeline_run, step, []),
                        verify_digest=verify_digest,
                    )
                except AnimusError as error:
                    problems.append(
                        {
                            "field": f"spec/steps/{index}",
                            "problem": f"step {step['name']!r}: {error.message}",
                            "code": error.code,
                            "details": error.details,
                        }
                    )
                raise _Undo()
        except _Undo:
            pass
    _refuse(problems, "the pipeline cannot start")


def _cached(verify_digest: runs.DigestVerifier) -> runs.DigestVerifier:
    answers: dict[str, str | None] = {}

    def verify(digest: str) -> str | None:
        if digest not in answers:
            answers[digest] = verify_digest(digest)
        return answers[digest]

    return verify


def start_pipeline_run(
    ctx: Context,
    project: Project,
    pipeline: Pipeline,
    *,
    verify_digest: runs.DigestVerifier,
    source: PipelineRun | None = None,
) -> PipelineRun:
    """Start a run of ``pipeline``; with ``source``, reuse its succeeded steps whose inputs are
    identical (same Runs referenced, nothing executed again).

    The spec is checked again (a referenced object may have changed project rules since) and
    every step that will run is tried against ``runs.create_run`` first: if any is refused,
    nothing starts and every refusal is listed.
    """
    _refuse(spec_problems(project, pipeline.spec), "the pipeline is no longer valid")
    verify_digest = _cached(verify_digest)
    spec_steps = pipeline.spec["steps"]
    with db.write_transaction():
        pipeline_run = PipelineRun.create(
            id=new_id("prun"),
            project_id=project.id,
            pipeline_id=pipeline.id,
            state="running",
            source_pipeline_run_id=source.id if source else None,
            created_by=ctx.principal.actor,
        )
        reused = _reusable(source, spec_steps) if source else {}
        _preflight(
            ctx,
            project,
            pipeline_run,
            [s for s in spec_steps if s["name"] not in reused],
            verify_digest,
        )
        for position, step in enumerate(spec_steps):
            previous = reused.get(step["name"])
            PipelineStep.create(
                pipeline_run_id=pipeline_run.id,
                name=step["name"],
                position=position,
                state="succeeded" if previous else "pending",
                run_id=previous.run_id if previous else None,
                reused=previous is not None,
                input_digest=previous.input_digest if previous else None,
                reason=f"reused from pipeline run {source.id}" if previous else None,
            )
        audit.record(
            ctx,
            Action.PIPELINE_RUN_CREATED,
            project_id=project.id,
            object_type="pipeline_run",
            object_id=pipeline_run.id,
            payload={
                "pipeline_id": pipeline.id,
                "pipeline_digest": pipeline.digest,
                "source_pipeline_run_id": pipeline_run.source_pipeline_run_id,
                "reused_steps": {name: s.run_id for name, s in sorted(reused.items())},
            },
        )
        advance(ctx, pipeline_run, verify_digest=verify_digest)
    return pipeline_run


def _reusable(source: PipelineRun, spec_steps: list[dict]) -> dict[str, PipelineStep]:
    """The source's succeeded steps whose inputs are unchanged: every upstream step is reused
    too (so the artifacts they consume are the same digests) and the input digest matches."""
    previous = {s.name: s for s in steps_of(source)}
    by_name = {s["name"]: s for s in spec_steps}
    reused: dict[str, PipelineStep] = {}
    for name in _topological(spec_steps):
        step, before = by_name[name], previous.get(name)
        if before is None or before.state != "succeeded":
            continue
        if not all(dep in reused for dep in dependencies(step)):
            continue
        pinned, missing = _artifact_inputs(step, {n: s.run_id for n, s in reused.items()})
        if not missing and _input_digest(step, pinned) == before.input_digest:
            reused[name] = before
    return reused


def _topological(spec_steps: list[dict]) -> list[str]:
    order: list[str] = []
    remaining = {s["name"]: set(dependencies(s)) for s in spec_steps}
    while remaining:
        ready = [n for n, deps in remaining.items() if deps <= set(order)]
        order += ready
        for name in ready:
            del remaining[name]
    return order


def rerun_from_failed(
    ctx: Context, project: Project, source: PipelineRun, *, verify_digest: runs.DigestVerifier
) -> PipelineRun:
    """A new run of the same pipeline that reuses the source's unchanged succeeded steps."""
    if source.state != "failed":
        raise AnimusError(
            f"the pipeline run is {source.state}: only a failed one can be re-run from its "
            "failed steps",
            code="invalid_state",
        )
    pipeline = Pipeline.get_by_id(source.pipeline_id)
    return start_pipeline_run(ctx, project, pipeline, verify_digest=verify_digest, source=source)


def advance(ctx: Context, pipeline_run: PipelineRun, *, verify_digest: runs.DigestVerifier) -> None:
    """Move ``pipeline_run`` forward, in the caller's transaction or one of its own.

    Steps whose Run finished take its outcome; steps depending on a failed step stop (the
    reason names it); every step whose dependencies all succeeded gets its Run now, so
    independent steps run in parallel up to the Data Planes' capacity.
    """
    with db.write_transaction():
        query = PipelineRun.select().where(PipelineRun.id == pipeline_run.id)
        if db.dialect() == "postgresql":
            query = query.for_update()
        pipeline_run = query.get()
        if pipeline_run.state != "running":
            return
        project = Project.get_by_id(pipeline_run.project_id)
        spec = {s["name"]: s for s in Pipeline.get_by_id(pipeline_run.pipeline_id).spec["steps"]}
        steps = {s.name: s for s in steps_of(pipeline_run)}
        for step in steps.values():
            if step.state == "running":
                run_state = Run.select(Run.state).where(Run.id == step.run_id).scalar()
                if run_state == "succeeded":
                    _set_step(ctx, pipeline_run, step, "succeeded")
                elif run_state in runs.TERMINAL:
                    _set_step(ctx, pipeline_run, step, "failed", reason=f"run {run_state}")
        for name in _topological(list(spec.values())):
            step = steps[name]
            if step.state != "pending":
                continue
            deps = [steps[d] for d in dependencies(spec[name])]
            blocked = next((d for d in deps if d.state in ("failed", "stopped")), None)
            if blocked is not None:
                cause = blocked.name if blocked.state == "failed" else _root_failure(blocked)
                _set_step(
                    ctx, pipeline_run, step, "stopped", reason=f"upstream step {cause!r} failed"
                )
            elif all(d.state == "succeeded" for d in deps):
                _start_step(ctx, project, pipeline_run, step, spec[name], steps, verify_digest)
        if all(s.state in _FINISHED_STEP for s in steps.values()):
            outcome = (
                "succeeded" if all(s.state == "succeeded" for s in steps.values()) else "failed"
            )
            PipelineRun.update(state=outcome, finished_at=utc_now()).where(
                PipelineRun.id == pipeline_run.id
            ).execute()
            audit.record(
                ctx,
                Action.PIPELINE_RUN_STATE_CHANGED,
                project_id=pipeline_run.project_id,
                object_type="pipeline_run",
                object_id=pipeline_run.id,
                payload={"from": "running", "to": outcome},
            )


def _root_failure(step: PipelineStep) -> str:
    """The failed step named in a stopped step's reason."""
    match = re.search(r"'([^']+)'", step.reason or "")
    return match.group(1) if match else step.name


def _start_step(
    ctx: Context,
    project: Project,
    pipeline_run: PipelineRun,
    step: PipelineStep,
    definition: dict,
    steps: dict[str, PipelineStep],
    verify_digest: runs.DigestVerifier,
) -> None:
    pinned, missing = _artifact_inputs(definition, {n: s.run_id for n, s in steps.items()})
    if missing:
        _set_step(ctx, pipeline_run, step, "failed", reason="; ".join(missing))
        return
    try:
        with db.database.atomic():
            run = runs.create_run(
                ctx,
                project,
                _run_request(pipeline_run, definition, pinned),
                verify_digest=verify_digest,
            )
    except AnimusError as error:
        _set_step(ctx, pipeline_run, step, "failed", reason=f"run refused: {error.message}")
        return
    _set_step(
        ctx,
        pipeline_run,
        step,
        "running",
        run_id=run.id,
        input_digest=_input_digest(definition, pinned),
    )


def advance_all(ctx: Context, verify_digest: runs.DigestVerifier) -> int:
    """One scheduler pass over running pipeline runs; returns how many steps changed."""
    verify_digest = _cached(verify_digest)
    changed = 0
    for pipeline_run in PipelineRun.select().where(PipelineRun.state == "running"):
        before = _states(pipeline_run)
        advance(ctx, pipeline_run, verify_digest=verify_digest)
        changed += sum(1 for a, b in zip(before, _states(pipeline_run), strict=True) if a != b)
    return changed


def _states(pipeline_run: PipelineRun) -> list[str]:
    return [s.state for s in steps_of(pipeline_run)]
