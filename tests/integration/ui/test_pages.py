"""Every UI page renders on SQLite and PostgreSQL, driven through the UI's own forms.

The Data Plane's part (running the code) is played over its real HTTP contract, as in the
API tests; everything a person does goes through the pages.
"""

from __future__ import annotations

import hashlib
import html
import io
import re

import pytest

from appliance.auth import identities
from appliance.domain.context import SYSTEM, Context
from appliance.domain.records import AuditEvent, Model, ModelVersion, Run
from appliance.execution import scheduler
from tests.integration.ui.conftest import Browser, make_person, text

DP = "/api/v1/dataplane"
COMMIT = "3" * 40
WEIGHTS = b"weights-" + bytes(range(256))


def location(response) -> str:
    assert response.status_code == 302, text(response)[:2000]
    return response.headers["Location"]


def finish_run(plane, rid: str) -> None:
    """Act as the Data Plane: run ``rid`` to success with a log, metrics and model.bin."""
    assert plane.post(f"{DP}/leases", json={"capacity": 8}).status_code == 200
    plane.post(f"{DP}/runs/{rid}/state", json={"state": "running"})
    plane.post(f"{DP}/runs/{rid}/logs", json={"offset": 0, "data": "epoch 1 <b>not bold</b>\n"})
    records = [
        {"seq": step, "name": "loss", "value": 1.0 / (step + 1), "step": step} for step in range(5)
    ] + [{"seq": 5, "name": "accuracy", "value": 0.9, "step": 4}]
    plane.post(f"{DP}/runs/{rid}/metrics", json={"records": records})
    stored = plane.put(
        f"{DP}/runs/{rid}/artifacts/model.bin",
        data=WEIGHTS,
        headers={"X-Content-SHA256": hashlib.sha256(WEIGHTS).hexdigest()},
    )
    assert stored.status_code == 200, stored.text
    plane.post(f"{DP}/runs/{rid}/state", json={"state": "succeeded", "exit_code": 0})


@pytest.fixture
def world(app, server, bound_db, config):
    """alice's project with a dataset version, code, a lock, a finished run and a model."""
    make_person("alice")
    ui = Browser(app)
    ui.sign_in("alice")
    project_url = location(ui.post("/ui/projects", {"name": "fraud", "description": "<i>x</i>"}))
    pid = project_url.rsplit("/", 1)[1]
    dataset_url = location(ui.post(f"{project_url}/datasets", {"name": "loans"}))
    upload_action = re.search(
        r'enctype="multipart/form-data" class="stack"\s+action="([^"]+)"', text(ui.get(dataset_url))
    ).group(1)
    upload = ui.client.post(
        html.unescape(upload_action),
        data={"files": (io.BytesIO(b"a,b\n1,2\n"), "loans.csv")},
        content_type="multipart/form-data",
    )
    version_url = location(upload)
    ui.get(f"{project_url}/code")
    location(
        ui.post(
            f"{project_url}/code", {"repo_url": "file:///srv/git/credit.git", "revision": COMMIT}
        )
    )
    ui.get(f"{project_url}/environments")
    location(ui.post(f"{project_url}/environments", {"name": "train", "base_image": "runner"}))
    env_id = re.search(
        r'<option value="(env_[0-9a-z]+)"', text(ui.get(f"{project_url}/environments"))
    )
    location(
        ui.post(
            f"{project_url}/environment-locks",
            {"environment_id": env_id.group(1), "image_digest": "sha256:" + "b" * 64},
        )
    )
    page = text(ui.get(f"{project_url}/runs"))
    code_ref = re.search(r'name="code_ref_id"[^>]*><option value="([^"]+)"', page).group(1)
    lock = re.search(r'name="environment_lock_id"[^>]*><option value="([^"]+)"', page).group(1)
    version_id = version_url.rsplit("/", 1)[1]
    run_url = location(
        ui.post(
            f"{project_url}/runs",
            {
                "code_ref_id": code_ref,
                "environment_lock_id": lock,
                "dataset_version_id": version_id,
                "command": "python3 train.py --depth '4'",
                "parameters": '{"depth": 4}',
            },
        )
    )
    rid = run_url.rsplit("/", 1)[1]
    scheduler.tick(config)
    _, credential = identities.register_data_plane(Context(SYSTEM, "test"), "dp-ui", "runc")
    finish_run(server.client(credential), rid)
    ui.get(f"{project_url}/models")
    model_url = location(ui.post(f"{project_url}/models", {"name": "credit-risk"}))
    model_id = model_url.rsplit("/", 1)[1]
    ui.get(run_url)
    mv_url = location(
        ui.post(f"{run_url}/register", {"model_id": model_id, "artifact_path": "model.bin"})
    )
    return {
        "ui": ui,
        "pid": pid,
        "project": project_url,
        "dataset": dataset_url,
        "version": version_url,
        "run": run_url,
        "rid": rid,
        "model": model_url,
        "model_version": mv_url,
        "server": server,
        "config": config,
    }


def test_every_project_page_renders_with_its_records(world):
    ui, project = world["ui"], world["project"]
    expectations = {
        project: ["fraud", "succeeded", "&lt;i&gt;x&lt;/i&gt;"],
        f"{project}/datasets": ["loans", "v1"],
        world["dataset"]: ["v1", "Upload a new version"],
        world["version"]: ["loans.csv", "sha256:", "Lineage", world["rid"]],
        f"{project}/code": [COMMIT],
        f"{project}/environments": ["runner", "sha256:bbbb"],
        f"{project}/runs": [world["rid"], "Start a run"],
        f"{project}/runs?state=succeeded": [world["rid"]],
        f"{project}/pipelines": ["No pipelines yet"],
        f"{project}/models": ["credit-risk", "v1"],
        world["model"]: ["v1", "registered"],
        world["model_version"]: ["model.bin", "Approve", "Reject"],
        f"{project}/members": ["alice", "admin"],
        f"{project}/policy": ["required_approvals"],
        f"{project}/service-accounts": ["New service account"],
        f"{project}/audit": ["run:record:created", "dataset:version:created"],
        f"{world['run']}/lineage": ["loans v1", "model.bin"],
        "/ui/account": ["this session"],
    }
    for path, expected in expectations.items():
        response = ui.get(path)
        assert response.status_code == 200, (path, text(response)[:3000])
        for fragment in expected:
            assert fragment in text(response), (path, fragment)
    assert "No runs match." in text(ui.get(f"{project}/runs?state=failed"))


def test_the_run_page_shows_inputs_snapshot_log_metrics_and_artifacts(world):
    page = text(world["ui"].get(world["run"]))
    assert "loans v1" in page and "Execution snapshot" in page and "sha256:" in page
    # The log is escaped, never interpreted as markup.
    assert "epoch 1 &lt;b&gt;not bold&lt;/b&gt;" in page
    charts = re.findall(r'<svg class="chart".*?</svg>', page, re.S)
    assert len(charts) == 2, "one chart per metric: accuracy and loss"
    loss = next(c for c in charts if "metric loss" in c)
    points = re.search(r'<polyline class="series" points="([^"]+)"', loss).group(1).split()
    assert len(points) == 5
    ys = [float(p.split(",")[1]) for p in points]
    assert ys == sorted(ys), "a falling loss is drawn going down the chart (SVG y grows down)"
    assert "model.bin" in page and "Register version" in page
    download = world["ui"].get(f"{world['run']}/artifacts/model.bin")
    assert download.status_code == 200 and download.data == WEIGHTS


def test_live_log_endpoint_follows_offsets(world):
    response = world["ui"].get(f"{world['run']}/log?offset=6")
    assert response.status_code == 200
    assert response.get_data(as_text=True) == "1 <b>not bold</b>\n"
    assert response.headers["X-Run-State"] == "succeeded"
    assert int(response.headers["X-Log-Offset"]) == len("epoch 1 <b>not bold</b>\n")
    states = world["ui"].get(f"{world['project']}/runs/states?ids={world['rid']}")
    assert states.get_json() == {world["rid"]: "succeeded"}


def test_rerun_and_replay_create_linked_runs(world, bound_db):
    ui = world["ui"]
    ui.get(world["run"])
    replay = location(ui.post(f"{world['run']}/replay"))
    replayed = Run.get_by_id(replay.rsplit("/", 1)[1])
    assert (replayed.source_run_id, replayed.source_kind) == (world["rid"], "replay")
    rerun = location(ui.post(f"{world['run']}/rerun"))
    assert Run.get_by_id(rerun.rsplit("/", 1)[1]).source_kind == "rerun"
    refused = ui.post(f"{world['run']}/retry")
    assert refused.status_code == 409
    assert "only a failed run can be retried" in text(refused)


def test_an_admin_approves_and_exports_a_model_version(world, bound_db):
    ui, mv = world["ui"], world["model_version"]
    ui.get(mv)
    empty = ui.post(f"{mv}/approve", {"reason": "   "})
    assert empty.status_code == 400 and "reason is required" in text(empty)
    assert location(ui.post(f"{mv}/approve", {"reason": "AUC above the bar"})) == mv
    version = ModelVersion.get_by_id(mv.rsplit("/", 1)[1])
    assert version.stage == "approved" and version.decision_reason == "AUC above the bar"
    event = AuditEvent.get(AuditEvent.action == "model:version:approved")
    assert event.actor == "user:alice" and event.payload["reason"] == "AUC above the bar"
    ui.get(mv)
    assert location(ui.post(f"{mv}/export")) == mv
    page = text(ui.get(mv))
    assert "Download the latest package" in page
    package = ui.get(f"{mv}/export")
    assert package.status_code == 200 and package.mimetype == "application/x-tar"


def test_a_pipeline_is_drawn_as_a_dag(world, bound_db):
    ui, project = world["ui"], world["project"]
    run = Run.get_by_id(world["rid"])
    step = {
        "code_ref_id": run.code_ref_id,
        "environment_lock_id": run.environment_lock_id,
        "command": ["python3", "prep.py"],
    }
    spec = {
        "steps": [
            {**step, "name": "prep"},
            {**step, "name": "train", "depends_on": ["prep"]},
            {**step, "name": "report", "depends_on": ["prep", "train"]},
        ]
    }
    import json

    ui.get(f"{project}/pipelines")
    assert location(ui.post(f"{project}/pipelines", {"name": "nightly", "spec": json.dumps(spec)}))
    page = text(ui.get(f"{project}/pipelines"))
    start = re.search(r'action="([^"]+/pipelines/[^"]+/runs)"', page).group(1)
    pipeline_run = location(ui.post(start))
    page = text(ui.get(pipeline_run))
    dag = re.search(r'<svg class="dag".*?</svg>', page, re.S).group(0)
    assert dag.count('<g class="node') == 3
    assert dag.count('class="edge"') == 3, "prep→train, prep→report, train→report"
    bad = ui.post(f"{project}/pipelines", {"name": "broken", "spec": "{not json"})
    assert bad.status_code == 400 and "not valid JSON" in text(bad)


def test_the_model_registry_lists_what_was_registered(world, bound_db):
    assert Model.select().count() == 1
    page = text(world["ui"].get(world["model"]))
    assert "loss 0.2" in page and world["rid"] in page


def test_system_admin_and_auditor_pages_render(app, bound_db, world):
    make_person("root", "admin")
    make_person("audrey", "auditor")
    admin = Browser(app)
    admin.sign_in("root")
    for path, fragment in {
        "/ui/admin/users": "alice",
        "/ui/admin/sessions": "alice",
        "/ui/admin/health": "dp-ui",
    }.items():
        response = admin.get(path)
        assert response.status_code == 200 and fragment in text(response), path
    assert "database" in text(admin.get("/ui/admin/health"))
    auditor = Browser(app)
    auditor.sign_in("audrey")
    log = auditor.get("/ui/audit?action=run:record:created")
    assert log.status_code == 200 and world["rid"] in text(log)
    assert "auth:login:succeeded" not in text(log), "the action filter narrows the events"
    chain = text(auditor.get("/ui/audit/chain"))
    head = AuditEvent.select().count()
    assert f"Verified up to seq {head}" in chain
    export = text(auditor.get("/ui/audit/export"))
    assert "--trust-fingerprint" in export
    verifier = auditor.get("/ui/audit/verifier")
    assert verifier.status_code == 200 and b"def verify(" in verifier.data


def test_lineage_of_a_widely_used_version_is_capped_and_says_so(world, bound_db):
    from appliance.domain import lineage
    from appliance.domain.records import DatasetVersion, Project

    ui = world["ui"]
    for _ in range(4):
        ui.get(world["run"])
        location(ui.post(f"{world['run']}/rerun"))
    project = Project.get_by_id(world["pid"])
    version = DatasetVersion.get_by_id(world["version"].rsplit("/", 1)[1])
    full = lineage.lineage_graph(project, version.id)
    assert full["truncated"] is False
    assert sum(n["type"] == "run" for n in full["nodes"]) == 5
    capped = lineage.lineage_graph(project, version.id, max_nodes=3)
    assert capped["truncated"] is True and len(capped["nodes"]) == 3
    page = text(ui.get(world["version"]))
    assert page.count('<g class="node') == len(full["nodes"])


def test_a_production_run_missing_its_requirements_is_refused_with_the_list(world, bound_db):
    ui, project = world["ui"], world["project"]
    run = Run.get_by_id(world["rid"])
    before = Run.select().count()
    ui.get(f"{project}/runs")
    refused = ui.post(
        f"{project}/runs",
        {
            "code_ref_id": run.code_ref_id,
            "environment_lock_id": run.environment_lock_id,
            "command": "python3 train.py",
            "production": "on",
        },
    )
    assert refused.status_code == 422
    body = text(refused)
    assert "a production run needs a commit SHA" in body
    assert "no explicit DatasetVersion inputs" in body
    assert "no registry is configured" in body
    assert Run.select().count() == before


def test_project_admin_forms_members_policy_and_service_accounts(app, world, bound_db):
    import json

    ui, project = world["ui"], world["project"]
    make_person("bob")
    ui.get(f"{project}/members")
    assert location(ui.post(f"{project}/members", {"username": "bob", "role": "editor"}))
    assert "bob" in text(ui.get(f"{project}/members"))
    unknown = ui.post(f"{project}/members", {"username": "nobody", "role": "viewer"})
    assert unknown.status_code == 404 and "no user &#39;nobody&#39;" in text(unknown)
    last_admin = ui.post(f"{project}/members/alice/remove")
    assert last_admin.status_code == 409 and "at least one admin" in text(last_admin)
    assert location(ui.post(f"{project}/members/bob/remove"))
    assert "bob" not in text(ui.get(f"{project}/members"))

    policy = json.loads(
        re.search(
            r'<textarea id="policy"[^>]*>(.*?)</textarea>', text(ui.get(f"{project}/policy")), re.S
        )
        .group(1)
        .replace("&#34;", '"')
    )
    policy["required_approvals"] = 2
    assert location(ui.post(f"{project}/policy", {"policy": json.dumps(policy)}))
    assert '"required_approvals": 2' in text(ui.get(f"{project}/policy")).replace("&#34;", '"')
    bad = ui.post(f"{project}/policy", {"policy": '{"egress": 1}'})
    assert bad.status_code == 422
    assert AuditEvent.select().where(AuditEvent.action == "project:policy:updated").count() == 1

    ui.get(f"{project}/service-accounts")
    assert location(ui.post(f"{project}/service-accounts", {"name": "ci-bot", "role": "editor"}))
    page = text(ui.get(f"{project}/service-accounts"))
    issue = re.search(r'action="([^"]+/service-accounts/sa_[0-9a-z]+/tokens)"', page).group(1)
    issued = ui.post(issue, {"name": "ci", "days": "2"})
    assert issued.status_code == 201
    secret = re.search(r"(anm_[A-Za-z0-9_-]+)", text(issued)).group(1)
    me = app.test_client().get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"})
    assert me.get_json()["kind"] == "service_account"
    page = text(ui.get(f"{project}/service-accounts"))
    assert secret not in page
    revoke = re.search(r'action="([^"]+/tokens/tok_[0-9a-z]+/revoke)"', page).group(1)
    assert location(ui.post(revoke))
    again = app.test_client().get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"})
    assert again.status_code == 401


def test_a_refused_register_form_is_shown_again_not_a_server_error(world, bound_db):
    ui, run_url = world["ui"], world["run"]
    ui.get(run_url)
    missing = ui.post(f"{run_url}/register", {"artifact_path": "model.bin"})
    assert missing.status_code == 400, text(missing)[:500]
    assert "model id is required" in text(missing)
    unknown = ui.post(
        f"{run_url}/register", {"model_id": "mdl_" + "0" * 26, "artifact_path": "model.bin"}
    )
    assert unknown.status_code == 404 and "Register" in text(unknown), "shown on the run page"
