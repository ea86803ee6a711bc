"""Every API route × every kind of caller, with the expected status (DESIGN §8).

The table must name every declared operation: a new route without a row fails this test.
Refused mutations by authenticated callers must leave an ``authz:request:denied`` event.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import tarfile

import pytest

from appliance.api.routing import OPERATIONS
from appliance.audit import signing
from appliance.auth import identities, sessions
from appliance.domain.context import SYSTEM, Context
from appliance.domain.records import AuditEvent, SignInFailure, User
from appliance.execution import scheduler

CALLERS = ("anonymous", "viewer", "editor", "admin", "other_admin", "auditor", "service_account")

#                                                anon viewer editor admin other auditor sa
# fmt: off
EXPECTED: dict[str, tuple[int, ...]] = {
    "identity.login":                             (401, 401, 401, 401, 401, 401, 401),
    "identity.me":                                (401, 200, 200, 200, 200, 200, 200),
    "identity.create_token":                      (401, 201, 201, 201, 201, 201, 403),
    "identity.list_tokens":                       (401, 200, 200, 200, 200, 200, 403),
    "identity.revoke_token":                      (401, 404, 404, 200, 404, 404, 404),
    "identity.create_user":                       (401, 403, 403, 403, 403, 403, 403),
    "identity.list_users":                        (401, 403, 403, 403, 403, 403, 403),
    "identity.get_user":                          (401, 403, 403, 403, 403, 403, 403),
    "sessions.list_sessions":                     (401, 403, 403, 403, 403, 403, 403),
    "sessions.revoke_session":                    (401, 403, 403, 403, 403, 403, 403),
    "projects.create_project":                    (401, 201, 201, 201, 201, 403, 403),
    "projects.list_projects":                     (401, 200, 200, 200, 200, 200, 200),
    "projects.get_project":                       (401, 200, 200, 200, 404, 404, 200),
    "projects.get_policy":                        (401, 200, 200, 200, 404, 404, 200),
    "projects.put_policy":                        (401, 403, 403, 200, 404, 404, 403),
    "projects.create_policy_snapshot":            (401, 403, 201, 201, 404, 404, 201),
    "projects.get_policy_snapshot":               (401, 200, 200, 200, 404, 404, 200),
    "projects.list_members":                      (401, 200, 200, 200, 404, 404, 200),
    "projects.put_member":                        (401, 403, 403, 200, 404, 404, 403),
    "projects.delete_member":                     (401, 403, 403, 204, 404, 404, 403),
    "projects.create_service_account":            (401, 403, 403, 201, 404, 404, 403),
    "projects.list_service_accounts":             (401, 403, 403, 200, 404, 404, 403),
    "projects.create_service_account_token":      (401, 403, 403, 201, 404, 404, 403),
    "datasets.create_dataset":                    (401, 403, 201, 201, 404, 404, 201),
    "datasets.list_datasets":                     (401, 200, 200, 200, 404, 404, 200),
    "datasets.get_dataset":                       (401, 200, 200, 200, 404, 404, 200),
    "datasets.create_version":                    (401, 403, 201, 201, 404, 404, 201),
    "datasets.list_versions":                     (401, 200, 200, 200, 404, 404, 200),
    "datasets.get_version":                       (401, 200, 200, 200, 404, 404, 200),
    "datasets.patch_version":                     (401, 403, 409, 409, 404, 404, 409),
    "datasets.delete_version":                    (401, 403, 409, 409, 404, 404, 409),
    "datasets.download_file":                     (401, 200, 200, 200, 404, 404, 200),
    "code.create_code_ref":                       (401, 403, 201, 201, 404, 404, 201),
    "code.list_code_refs":                        (401, 200, 200, 200, 404, 404, 200),
    "code.get_code_ref":                          (401, 200, 200, 200, 404, 404, 200),
    "code.patch_code_ref":                        (401, 403, 409, 409, 404, 404, 409),
    "code.delete_code_ref":                       (401, 403, 409, 409, 404, 404, 409),
    "code.create_environment":                    (401, 403, 201, 201, 404, 404, 201),
    "code.list_environments":                     (401, 200, 200, 200, 404, 404, 200),
    "code.get_environment":                       (401, 200, 200, 200, 404, 404, 200),
    "code.create_lock":                           (401, 403, 201, 201, 404, 404, 201),
    "code.list_locks":                            (401, 200, 200, 200, 404, 404, 200),
    "code.get_lock":                              (401, 200, 200, 200, 404, 404, 200),
    "code.patch_lock":                            (401, 403, 409, 409, 404, 404, 409),
    "code.delete_lock":                           (401, 403, 409, 409, 404, 404, 409),
    "runs.create_run":                            (401, 403, 201, 201, 404, 404, 201),
    "runs.list_runs":                             (401, 200, 200, 200, 404, 404, 200),
    "runs.get_run":                               (401, 200, 200, 200, 404, 404, 200),
    "runs.get_snapshot":                          (401, 200, 200, 200, 404, 404, 200),
    "runs.get_logs":                              (401, 200, 200, 200, 404, 404, 200),
    "runs.get_metrics":                           (401, 200, 200, 200, 404, 404, 200),
    "runs.list_artifacts":                        (401, 200, 200, 200, 404, 404, 200),
    "runs.download_artifact":                     (401, 200, 200, 200, 404, 404, 200),
    "runs.approve_run":                           (401, 403, 403, 409, 404, 404, 403),
    "runs.cancel_run":                            (401, 403, 200, 200, 404, 404, 200),
    "runs.rerun":                                 (401, 403, 201, 201, 404, 404, 201),
    "runs.retry":                                 (401, 403, 409, 409, 404, 404, 409),
    "runs.replay":                                (401, 403, 201, 201, 404, 404, 201),
    "dataplane.lease":                            (401, 403, 403, 403, 403, 403, 403),
    "dataplane.reconcile":                        (401, 403, 403, 403, 403, 403, 403),
    "dataplane.heartbeat":                        (401, 403, 403, 403, 403, 403, 403),
    "dataplane.secret_value":                     (401, 403, 403, 403, 403, 403, 403),
    "dataplane.report_state":                     (401, 403, 403, 403, 403, 403, 403),
    "dataplane.append_logs":                      (401, 403, 403, 403, 403, 403, 403),
    "dataplane.add_metrics":                      (401, 403, 403, 403, 403, 403, 403),
    "dataplane.put_artifact":                     (401, 403, 403, 403, 403, 403, 403),
    "dataplane.artifact_input":                   (401, 403, 403, 403, 403, 403, 403),
    "dataplane.input_file":                       (401, 403, 403, 403, 403, 403, 403),
    "audit.project_events":                       (401, 403, 403, 200, 404, 200, 403),
    "audit.all_events":                           (401, 403, 403, 403, 403, 200, 403),
    "audit.chain_status":                         (401, 403, 403, 403, 403, 200, 403),
    "models.create_model":                        (401, 403, 201, 201, 404, 404, 201),
    "models.list_models":                         (401, 200, 200, 200, 404, 404, 200),
    "models.get_model":                           (401, 200, 200, 200, 404, 404, 200),
    "models.create_version":                      (401, 403, 201, 201, 404, 404, 201),
    "models.list_versions":                       (401, 200, 200, 200, 404, 404, 200),
    "models.get_version":                         (401, 200, 200, 200, 404, 404, 200),
    "models.get_lineage":                         (401, 200, 200, 200, 404, 404, 200),
    # Approval before rejection: once approved, a decision is final (409).
    "models.approve_version":                     (401, 403, 403, 200, 404, 404, 403),
    "models.reject_version":                      (401, 403, 403, 409, 404, 404, 403),
    "models.export_version":                      (401, 403, 201, 201, 404, 404, 201),
    "models.download_export":                     (401, 200, 200, 200, 404, 404, 200),
    "models.signing_key":                         (401, 200, 200, 200, 200, 200, 200),
    "pipelines.create_pipeline":                  (401, 403, 201, 201, 404, 404, 201),
    "pipelines.list_pipelines":                   (401, 200, 200, 200, 404, 404, 200),
    "pipelines.get_pipeline":                     (401, 200, 200, 200, 404, 404, 200),
    "pipelines.start_pipeline_run":               (401, 403, 201, 201, 404, 404, 201),
    "pipelines.list_pipeline_runs":               (401, 200, 200, 200, 404, 404, 200),
    "pipelines.get_pipeline_run":                 (401, 200, 200, 200, 404, 404, 200),
    # The pipeline run is still running: only a failed one can be re-run (409).
    "pipelines.rerun_from_failed":                (401, 403, 409, 409, 404, 404, 409),
    # Last: archiving makes the project read-only for every row after it.
    "projects.archive_project":                   (401, 403, 403, 200, 404, 404, 403),
}
# fmt: on


def tar_of(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def world(server, make_user, project):
    """Callers of every kind except the project's admin and its service account."""
    callers = {"anonymous": server.client()}
    for role in ("viewer", "editor"):
        callers[role] = make_user(f"{role}-user").api
    other = make_user("olga")
    other.api.post("/api/v1/projects", json={"name": "olgas"})
    callers["other_admin"] = other.api
    callers["auditor"] = make_user("audra", "auditor").api
    make_user("guest")
    return callers


def test_every_route_for_every_caller(server, alice, project, world, config):
    pid = project["id"]
    api = alice.api
    for role in ("viewer", "editor"):
        api.put(f"/api/v1/projects/{pid}/members/{role}-user", json={"role": role})
    account = api.post(
        f"/api/v1/projects/{pid}/service-accounts", json={"name": "bot", "role": "editor"}
    ).json()
    bot_token = api.post(
        f"/api/v1/projects/{pid}/service-accounts/{account['id']}/tokens", json={}
    ).json()["token"]
    callers = {**world, "admin": api, "service_account": server.client(bot_token)}
    dataset = api.post(f"/api/v1/projects/{pid}/datasets", json={"name": "base"}).json()
    version = api.post(
        f"/api/v1/projects/{pid}/datasets/{dataset['id']}/versions",
        data=tar_of("a/b.csv", b"x,y\n1,2\n"),
        headers={"Content-Type": "application/x-tar"},
    ).json()
    code_ref = api.post(
        f"/api/v1/projects/{pid}/code-refs",
        json={"repo_url": "https://git.example/r.git", "commit_sha": "c" * 40},
    ).json()
    env = api.post(
        f"/api/v1/projects/{pid}/environments",
        json={"name": "base-env", "base_image": "runner", "packages": []},
    ).json()
    lock = api.post(
        f"/api/v1/projects/{pid}/environment-locks",
        json={"environment_id": env["id"], "image_digest": "sha256:" + "d" * 64, "packages": []},
    ).json()
    snapshot = api.post(f"/api/v1/projects/{pid}/policy-snapshots").json()
    spare_token = api.post("/api/v1/tokens", json={"name": "spare"}).json()
    guest_session, _ = sessions.start_session(
        Context(SYSTEM, "test"),
        User.get(User.username == "guest"),
        sessions.SessionPolicy(60, 60, 5),
    )
    run_spec = {
        "code_ref_id": code_ref["id"],
        "environment_lock_id": lock["id"],
        "inputs": [{"dataset_version_id": version["id"]}],
        "command": ["true"],
    }
    run = api.post(f"/api/v1/projects/{pid}/runs", json=run_spec).json()
    scheduler.tick(config)
    _, credential = identities.register_data_plane(Context(SYSTEM, "test"), "dp", "runc")
    plane = server.client(credential)
    plane.post("/api/v1/dataplane/leases", json={"capacity": 1})
    plane.post(f"/api/v1/dataplane/runs/{run['id']}/state", json={"state": "running"})
    artifact = plane.put(
        f"/api/v1/dataplane/runs/{run['id']}/artifacts/a/b.csv",
        data=b"out",
        headers={"X-Content-SHA256": hashlib.sha256(b"out").hexdigest()},
    ).json()
    # A second run that succeeds with a model artifact, registered as a model version.
    trained = api.post(f"/api/v1/projects/{pid}/runs", json=run_spec).json()
    scheduler.tick(config)
    plane.post("/api/v1/dataplane/leases", json={"capacity": 2})
    plane.post(f"/api/v1/dataplane/runs/{trained['id']}/state", json={"state": "running"})
    plane.put(
        f"/api/v1/dataplane/runs/{trained['id']}/artifacts/model.bin",
        data=b"weights",
        headers={"X-Content-SHA256": hashlib.sha256(b"weights").hexdigest()},
    )
    plane.post(
        f"/api/v1/dataplane/runs/{trained['id']}/state", json={"state": "succeeded", "exit_code": 0}
    )
    model = api.post(f"/api/v1/projects/{pid}/models", json={"name": "base-model"}).json()
    model_version = api.post(
        f"/api/v1/projects/{pid}/models/{model['id']}/versions",
        json={"run_id": trained["id"], "artifact_path": "model.bin"},
    ).json()
    pipeline_step = {k: v for k, v in run_spec.items() if k != "inputs"}
    pipeline_spec = {
        "steps": [
            {**pipeline_step, "name": "prep", "inputs": [{"name": "raw", **run_spec["inputs"][0]}]},
            {
                **pipeline_step,
                "name": "train",
                "inputs": [{"name": "features", "from_step": "prep", "artifact": "f.json"}],
            },
        ]
    }
    pipeline = api.post(
        f"/api/v1/projects/{pid}/pipelines", json={"name": "base-pipeline", "spec": pipeline_spec}
    ).json()
    pipeline_run = api.post(f"/api/v1/projects/{pid}/pipelines/{pipeline['id']}/runs").json()

    params = {
        "project_id": pid,
        "dataset_id": dataset["id"],
        "version_id": version["id"],
        "path": "a/b.csv",
        "code_ref_id": code_ref["id"],
        "environment_id": env["id"],
        "lock_id": lock["id"],
        "snapshot_id": snapshot["id"],
        "account_id": account["id"],
        "username": "guest",
        "token_id": spare_token["id"],
        "session_id": guest_session.id,
        "run_id": run["id"],
        "name": "S",
        "artifact_id": artifact["id"],
        "model_id": model["id"],
        "model_version_id": model_version["id"],
        "object_id": model_version["id"],
        "pipeline_id": pipeline["id"],
        "pipeline_run_id": pipeline_run["id"],
    }
    counter = itertools.count()

    def request_kwargs(endpoint: str) -> dict:
        n = next(counter)
        bodies = {
            "identity.login": {"username": "alice", "password": "not-her-password"},
            "identity.create_token": {"name": f"t{n}"},
            "identity.create_user": {"username": f"user{n}"},
            "projects.create_project": {"name": f"project-{n}"},
            "projects.put_policy": api.get(f"/api/v1/projects/{pid}/policy").json(),
            "projects.put_member": {"role": "viewer"},
            "projects.create_service_account": {"name": f"sa{n}", "role": "viewer"},
            "projects.create_service_account_token": {},
            "datasets.create_dataset": {"name": f"ds{n}"},
            "code.create_code_ref": {"repo_url": "https://git.example/r.git", "ref": "main"},
            "code.create_environment": {"name": f"env{n}", "base_image": "runner", "packages": []},
            "code.create_lock": {
                "environment_id": env["id"],
                "image_digest": "sha256:" + "e" * 64,
                "packages": [],
            },
            "runs.create_run": run_spec,
            "models.create_model": {"name": f"model{n}"},
            "pipelines.create_pipeline": {"name": f"pipeline{n}", "spec": pipeline_spec},
            "models.create_version": {"run_id": trained["id"], "artifact_path": "model.bin"},
            "models.approve_version": {"reason": "reviewed"},
            "models.reject_version": {"reason": "reviewed"},
            "runs.approve_run": {"reason": "reviewed"},
            "dataplane.lease": {"capacity": 1},
            "dataplane.reconcile": {"known_run_ids": []},
            "dataplane.report_state": {"state": "running"},
            "dataplane.append_logs": {"offset": 0, "data": "x"},
            "dataplane.add_metrics": {"records": []},
        }
        if endpoint == "identity.login":
            # The matrix is about who may call what: seven wrong passwords in a row would
            # trip the sign-in throttle (tests/integration/ui/test_hardening.py covers it).
            SignInFailure.delete().execute()
        if endpoint == "datasets.create_version":
            return {
                "data": tar_of(f"f{n}.txt", str(n).encode()),
                "headers": {"Content-Type": "application/x-tar"},
            }
        if endpoint in bodies:
            return {"json": bodies[endpoint]}
        return {}

    declared = {op.endpoint: op for op in OPERATIONS}
    assert set(EXPECTED) == set(declared), "every route needs a row in EXPECTED"
    failures = []
    denials = []
    for endpoint, statuses in EXPECTED.items():
        op = declared[endpoint]
        url = op.rule
        for name in op.path_params:
            url = url.replace(f"<{name}>", params[name]).replace(f"<path:{name}>", params[name])
        for caller, expected in zip(CALLERS, statuses, strict=True):
            if endpoint == "projects.delete_member" and caller == "admin":
                api.put(f"/api/v1/projects/{pid}/members/guest", json={"role": "viewer"})
            response = callers[caller].request(op.method, url, **request_kwargs(endpoint))
            if response.status_code != expected:
                failures.append(
                    f"{op.method} {url} as {caller}: {response.status_code} "
                    f"(expected {expected}) {response.text[:200]}"
                )
            if response.status_code >= 400:
                assert set(response.json()) == {"error", "message", "details", "request_id"}
            if (
                op.method != "GET"
                and caller != "anonymous"
                and expected in (403, 404)
                and (endpoint != "identity.login")
            ):
                denials.append((caller, op.method, url))
    assert failures == [], "\n".join(failures)

    denied = {
        (e.actor, e.object_id)
        for e in AuditEvent.select().where(AuditEvent.action == "authz:request:denied")
    }
    actors = {
        caller: callers[caller].get("/api/v1/me").json().get("actor")
        for caller in CALLERS
        if caller != "anonymous"
    }
    missing = [d for d in denials if (actors[d[0]], f"{d[1]} {d[2]}") not in denied]
    assert missing == [], f"refused mutations without an audit event: {missing}"
    signing.stop_agent(config.gnupg_home)
