"""Pipelines: validation before anything starts, parallel steps, stopping exactly the dependants
of a failed step, and re-running from the failed step.

The test acts as the Data Plane agent over the HTTP contract (as in test_runs.py) and as the
scheduler (``scheduler.tick``), which advances pipelines and plans their step Runs.
"""

from __future__ import annotations

import hashlib
import io
import tarfile

import peewee
import pytest

from appliance.auth import identities
from appliance.domain.context import SYSTEM, Context
from appliance.domain.records import AuditEvent, Pipeline, PipelineRun, Run
from appliance.execution import scheduler

COMMIT = "2" * 40
DP = "/api/v1/dataplane"


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def setup(server, alice, project, config, bound_db):
    pid = project["id"]
    api = alice.api
    ds = api.post(f"/api/v1/projects/{pid}/datasets", json={"name": "d"}).json()
    version = api.post(
        f"/api/v1/projects/{pid}/datasets/{ds['id']}/versions",
        data=tar_of({"x.csv": b"1,2\n"}),
        headers={"Content-Type": "application/x-tar"},
    ).json()
    code = api.post(
        f"/api/v1/projects/{pid}/code-refs",
        json={"repo_url": "file:///srv/git/model.git", "commit_sha": COMMIT},
    ).json()
    env = api.post(
        f"/api/v1/projects/{pid}/environments",
        json={"name": "e", "base_image": "runner", "packages": []},
    ).json()
    lock = api.post(
        f"/api/v1/projects/{pid}/environment-locks",
        json={"environment_id": env["id"], "image_digest": "sha256:" + "b" * 64, "packages": []},
    ).json()
    _, credential = identities.register_data_plane(Context(SYSTEM, "test"), "dp1", "runc")
    return {
        "pid": pid,
        "api": api,
        "version": version,
        "code": code,
        "lock": lock,
        "plane": server.client(credential),
        "config": config,
    }


def step(setup, name: str, *, inputs=(), depends_on=(), **extra) -> dict:
    spec = {
        "name": name,
        "code_ref_id": setup["code"]["id"],
        "environment_lock_id": setup["lock"]["id"],
        "command": ["python3", f"{name}.py"],
        "inputs": list(inputs),
        **extra,
    }
    if depends_on:
        spec["depends_on"] = list(depends_on)
    return spec


def artifact(from_step: str, path: str, name: str = "upstream") -> dict:
    return {"name": name, "from_step": from_step, "artifact": path}


def diamond(setup, *extra_steps: dict) -> list[dict]:
    """prep → (left, right) → join → report, artifacts flowing down by digest."""
    data = {"name": "raw", "dataset_version_id": setup["version"]["id"]}
    return [
        step(setup, "prep", inputs=[data]),
        step(setup, "left", inputs=[artifact("prep", "features.json")]),
        step(setup, "right", inputs=[artifact("prep", "features.json")]),
        step(setup, "join", inputs=[artifact("left", "model.json")], depends_on=["right"]),
        step(setup, "report", inputs=[artifact("join", "model.json")]),
        *extra_steps,
    ]


def create_pipeline(setup, steps: list[dict], name: str = "train") -> dict:
    response = setup["api"].post(
        f"/api/v1/projects/{setup['pid']}/pipelines", json={"name": name, "spec": {"steps": steps}}
    )
    assert response.status_code == 201, response.text
    return response.json()


def start(setup, pipeline: dict) -> dict:
    response = setup["api"].post(f"/api/v1/projects/{setup['pid']}/pipelines/{pipeline['id']}/runs")
    assert response.status_code == 201, response.text
    return response.json()


def status(setup, pipeline_run_id: str) -> dict:
    body = setup["api"].get(f"/api/v1/projects/{setup['pid']}/pipeline-runs/{pipeline_run_id}")
    assert body.status_code == 200, body.text
    return body.json()


def steps_by_name(pipeline_run: dict) -> dict[str, dict]:
    return {s["name"]: s for s in pipeline_run["steps"]}


def tick_and_lease(setup) -> list[str]:
    """The scheduler advances and plans; the agent leases everything it can."""
    scheduler.tick(setup["config"])
    leased = setup["plane"].post(f"{DP}/leases", json={"capacity": 10})
    assert leased.status_code == 200, leased.text
    return [r["run_id"] for r in leased.json()["runs"]]


def finish(setup, run_id: str, *, outputs: dict[str, bytes] | None = None, ok: bool = True) -> None:
    plane = setup["plane"]
    assert plane.post(f"{DP}/runs/{run_id}/state", json={"state": "running"}).status_code == 200
    for path, content in (outputs or {}).items():
        stored = plane.put(
            f"{DP}/runs/{run_id}/artifacts/{path}",
            data=content,
            headers={"X-Content-SHA256": hashlib.sha256(content).hexdigest()},
        )
        assert stored.status_code == 200, stored.text
    final = {"state": "succeeded", "exit_code": 0} if ok else {"state": "failed", "exit_code": 1}
    assert plane.post(f"{DP}/runs/{run_id}/state", json=final).status_code == 200


def test_diamond_runs_independent_steps_in_parallel(setup):
    api, pid = setup["api"], setup["pid"]
    pipeline = create_pipeline(setup, diamond(setup))
    assert pipeline["digest"].startswith("sha256:")
    started = start(setup, pipeline)
    states = {n: s["state"] for n, s in steps_by_name(started).items()}
    assert states == {
        "prep": "running",
        "left": "pending",
        "right": "pending",
        "join": "pending",
        "report": "pending",
    }
    assert Run.select().count() == 1
    prep = steps_by_name(started)["prep"]["run_id"]
    assert tick_and_lease(setup) == [prep]
    features = b'{"features": [1, 2]}'
    finish(setup, prep, outputs={"features.json": features})

    leased = tick_and_lease(setup)
    now = steps_by_name(status(setup, started["id"]))
    left, right = now["left"]["run_id"], now["right"]["run_id"]
    assert (now["left"]["state"], now["right"]["state"]) == ("running", "running")
    assert sorted(leased) == sorted([left, right])  # both middle steps held at the same time
    for rid in (left, right):
        setup["plane"].post(f"{DP}/runs/{rid}/state", json={"state": "running"})
    assert {Run.get_by_id(left).state, Run.get_by_id(right).state} == {"running"}
    assert now["join"]["state"] == "pending"

    # The artifact flows downstream by digest: recorded on the Run and in its frozen snapshot.
    consumed = api.get(f"/api/v1/projects/{pid}/runs/{left}").json()["parameters"]
    pinned = consumed["animus_pipeline"]["artifact_inputs"]
    assert pinned[0]["run_id"] == prep and pinned[0]["path"] == "features.json"
    assert pinned[0]["sha256"] == hashlib.sha256(features).hexdigest()
    snapshot = api.get(f"/api/v1/projects/{pid}/runs/{left}/snapshot").json()["snapshot"]
    assert snapshot["parameters"]["animus_pipeline"]["artifact_inputs"] == pinned
    # ... and it is an input of the run like a dataset file: mounted at /inputs/upstream,
    # fetched by the Data Plane over the contract and re-verified by digest.
    upstream = next(i for i in snapshot["inputs"] if i["name"] == "upstream")
    assert upstream["files"] == [
        {
            "path": "features.json",
            "sha256": hashlib.sha256(features).hexdigest(),
            "size": len(features),
        }
    ]
    fetched = setup["plane"].get(f"{DP}/runs/{left}/artifact-inputs/{upstream['artifact_id']}")
    assert fetched.status_code == 200 and fetched.content == features
    assert setup["plane"].get(f"{DP}/runs/{left}/artifact-inputs/art_other").status_code == 404

    finish(setup, left, outputs={"model.json": b"left-model"})
    finish(setup, right, outputs={"model.json": b"right-model"})
    tick_and_lease(setup)
    join = steps_by_name(status(setup, started["id"]))["join"]["run_id"]
    finish(setup, join, outputs={"model.json": b"joined"})
    tick_and_lease(setup)
    report = steps_by_name(status(setup, started["id"]))["report"]["run_id"]
    finish(setup, report)
    scheduler.tick(setup["config"])
    done = status(setup, started["id"])
    assert done["state"] == "succeeded" and done["finished_at"]
    assert {s["state"] for s in done["steps"]} == {"succeeded"}
    assert Run.select().count() == 5
    actions = [
        e.action
        for e in AuditEvent.select()
        .where(AuditEvent.object_id.in_([pipeline["id"], started["id"]]))
        .order_by(AuditEvent.seq)
    ]
    assert actions[:2] == ["pipeline:record:created", "pipeline:run:created"]
    assert actions.count("pipeline:step:state_changed") == 10  # 5 × (→running, →succeeded)
    assert actions[-1] == "pipeline:run:state_changed"
    listed = api.get(f"/api/v1/projects/{pid}/pipelines").json()["items"]
    assert [p["id"] for p in listed] == [pipeline["id"]]
    runs_listed = api.get(f"/api/v1/projects/{pid}/pipeline-runs").json()["items"]
    assert [r["id"] for r in runs_listed] == [started["id"]]


def test_invalid_specs_are_refused_with_every_problem(setup, bound_db):
    api, pid = setup["api"], setup["pid"]
    other = api.post("/api/v1/projects", json={"name": "other"}).json()
    ds = api.post(f"/api/v1/projects/{other['id']}/datasets", json={"name": "d"}).json()
    foreign = api.post(
        f"/api/v1/projects/{other['id']}/datasets/{ds['id']}/versions",
        data=tar_of({"y": b"2"}),
        headers={"Content-Type": "application/x-tar"},
    ).json()
    steps = [
        step(setup, "a", inputs=[artifact("b", "out.bin")]),
        step(setup, "b", depends_on=["a"]),
        step(setup, "c", inputs=[{"name": "raw", "dataset_version_id": foreign["id"]}]),
        {**step(setup, "d", depends_on=["ghost"]), "code_ref_id": "code_missing"},
        {**step(setup, "e"), "command": "python3 e.py"},
    ]
    refused = api.post(
        f"/api/v1/projects/{pid}/pipelines", json={"name": "bad", "spec": {"steps": steps}}
    )
    assert refused.status_code == 422, refused.text
    body = refused.json()
    assert body["error"] == "validation_failed"
    errors = {(e["field"], e["code"]) for e in body["details"]["errors"]}
    assert {
        ("spec/steps", "cycle"),
        ("spec/steps/2/inputs/0/dataset_version_id", "cross_project_reference"),
        ("spec/steps/3/code_ref_id", "unknown_reference"),
        ("spec/steps/3/depends_on", "unknown_reference"),
        ("spec/steps/4/command", "invalid_type"),
    } <= errors
    cycle = next(e for e in body["details"]["errors"] if e["code"] == "cycle")
    assert "a" in cycle["problem"] and "b" in cycle["problem"]
    assert Pipeline.select().count() == 0 and Run.select().count() == 0


def test_a_step_refused_by_the_gate_stops_the_pipeline_before_anything_starts(setup):
    api, pid = setup["api"], setup["pid"]
    branch = api.post(
        f"/api/v1/projects/{pid}/code-refs",
        json={"repo_url": "file:///srv/git/model.git", "ref": "main"},
    ).json()
    steps = diamond(setup)
    steps[4] = {**steps[4], "code_ref_id": branch["id"], "production": True}
    pipeline = create_pipeline(setup, steps)
    refused = api.post(f"/api/v1/projects/{pid}/pipelines/{pipeline['id']}/runs")
    assert refused.status_code == 422, refused.text
    (problem,) = refused.json()["details"]["errors"]
    assert problem["code"] == "production_requirements_unmet" and "'report'" in problem["problem"]
    assert Run.select().count() == 0 and PipelineRun.select().count() == 0


def test_failed_step_stops_exactly_its_dependants_and_rerun_reuses_upstream(setup, bound_db):
    api, pid = setup["api"], setup["pid"]
    summary = step(setup, "summary", inputs=[artifact("right", "model.json")])
    pipeline = create_pipeline(setup, diamond(setup, summary))
    first = start(setup, pipeline)
    prep = steps_by_name(first)["prep"]["run_id"]
    tick_and_lease(setup)
    finish(setup, prep, outputs={"features.json": b"f"})
    tick_and_lease(setup)
    middle = steps_by_name(status(setup, first["id"]))
    finish(setup, middle["left"]["run_id"], ok=False)
    finish(setup, middle["right"]["run_id"], outputs={"model.json": b"right-model"})

    tick_and_lease(setup)
    after = steps_by_name(status(setup, first["id"]))
    assert after["left"]["state"] == "failed"
    for dependant in ("join", "report"):
        assert after[dependant]["state"] == "stopped"
        assert after[dependant]["run_id"] is None
        assert "'left'" in after[dependant]["reason"]
    assert after["summary"]["state"] == "running"  # the independent branch continues
    assert status(setup, first["id"])["state"] == "running"
    finish(setup, after["summary"]["run_id"])
    scheduler.tick(setup["config"])
    failed = status(setup, first["id"])
    assert failed["state"] == "failed"
    runs_before = Run.select().count()
    assert runs_before == 4

    rerun = api.post(f"/api/v1/projects/{pid}/pipeline-runs/{first['id']}/rerun-from-failed")
    assert rerun.status_code == 201, rerun.text
    second = rerun.json()
    assert second["source_pipeline_run_id"] == first["id"]
    now, before = steps_by_name(second), steps_by_name(failed)
    for reused in ("prep", "right", "summary"):
        assert now[reused]["state"] == "succeeded" and now[reused]["reused"] is True
        assert now[reused]["run_id"] == before[reused]["run_id"]  # same Run, not re-executed
    assert now["left"]["state"] == "running" and now["left"]["run_id"] != before["left"]["run_id"]
    assert (now["join"]["state"], now["report"]["state"]) == ("pending", "pending")
    assert Run.select().count() == runs_before + 1

    tick_and_lease(setup)
    finish(setup, now["left"]["run_id"], outputs={"model.json": b"left-model"})
    tick_and_lease(setup)
    join = steps_by_name(status(setup, second["id"]))["join"]
    pinned = Run.get_by_id(join["run_id"]).parameters["animus_pipeline"]["artifact_inputs"]
    assert pinned[0]["run_id"] == now["left"]["run_id"]
    finish(setup, join["run_id"], outputs={"model.json": b"joined"})
    tick_and_lease(setup)
    finish(setup, steps_by_name(status(setup, second["id"]))["report"]["run_id"])
    scheduler.tick(setup["config"])
    assert status(setup, second["id"])["state"] == "succeeded"
    again = api.post(f"/api/v1/projects/{pid}/pipeline-runs/{second['id']}/rerun-from-failed")
    assert (again.status_code, again.json()["error"]) == (409, "invalid_state")


def test_pipelines_are_immutable_and_project_scoped(setup, bound_db, make_user):
    api, pid = setup["api"], setup["pid"]
    pipeline = create_pipeline(setup, diamond(setup))
    with pytest.raises(peewee.DatabaseError, match="immutable"), bound_db.atomic():
        bound_db.execute_sql("UPDATE pipelines SET name = 'x'")
    outsider = make_user("mallory").api
    hidden = outsider.get(f"/api/v1/projects/{pid}/pipelines/{pipeline['id']}")
    assert hidden.status_code == 404
    duplicate = api.post(
        f"/api/v1/projects/{pid}/pipelines",
        json={"name": "train", "spec": {"steps": diamond(setup)}},
    )
    assert (duplicate.status_code, duplicate.json()["error"]) == (409, "already_exists")
