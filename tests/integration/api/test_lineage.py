"""Lineage: DatasetVersion → Run → Artifact → ModelVersion, dataset version parents, run
sources (rerun, replay), and project isolation."""

from __future__ import annotations

import pytest

from appliance.audit import signing
from appliance.execution import scheduler
from tests.integration.api.test_models import finish_run, register, trained  # noqa: F401


@pytest.fixture(autouse=True)
def _stop_gpg_agent(config):
    yield
    signing.stop_agent(config.gnupg_home)


def graph(api, pid: str, object_id: str) -> tuple[dict, set, set]:
    response = api.get(f"/api/v1/projects/{pid}/lineage/{object_id}")
    assert response.status_code == 200, response.text
    body = response.json()
    nodes = {(n["id"], n["type"]) for n in body["nodes"]}
    edges = {(e["from"], e["to"], e["kind"]) for e in body["edges"]}
    return body, nodes, edges


def test_a_model_version_shows_its_data_run_and_artifact(trained):  # noqa: F811
    api, pid = trained["api"], trained["pid"]
    version = register(trained)
    run, raw, clean = trained["run"]["id"], trained["raw"]["id"], trained["clean"]["id"]
    artifact = version["artifact_id"]
    body, nodes, edges = graph(api, pid, version["id"])
    assert body["root"] == version["id"] and body["truncated"] is False
    assert {
        (raw, "dataset_version"),
        (clean, "dataset_version"),
        (run, "run"),
        (artifact, "artifact"),
        (version["id"], "model_version"),
        (trained["model"]["id"], "model"),
        (trained["code"]["id"], "code_ref"),
        (trained["lock"]["id"], "environment_lock"),
    } == nodes
    assert {
        (raw, clean, "derived_from"),
        (clean, run, "input"),
        (trained["code"]["id"], run, "code"),
        (trained["lock"]["id"], run, "environment"),
        (run, artifact, "output"),
        (artifact, version["id"], "registered_as"),
        (trained["model"]["id"], version["id"], "version"),
    } == edges
    labels = {n["id"]: n["label"] for n in body["nodes"]}
    assert labels[clean] == "loans v2" and labels[artifact] == "model.bin"
    assert labels[version["id"]] == "credit-risk v1 (registered)"


def test_a_dataset_version_shows_what_was_made_from_it(trained):  # noqa: F811
    api, pid = trained["api"], trained["pid"]
    version = register(trained)
    _, nodes, edges = graph(api, pid, trained["raw"]["id"])
    assert (version["id"], "model_version") in nodes
    assert (trained["clean"]["id"], trained["run"]["id"], "input") in edges
    # downstream only: the run's code ref is not something made from this dataset version
    assert (trained["code"]["id"], "code_ref") not in nodes


def test_reruns_and_replays_link_to_their_source(trained):  # noqa: F811
    api, pid, config = trained["api"], trained["pid"], trained["config"]
    source = trained["run"]["id"]
    replay = api.post(f"/api/v1/projects/{pid}/runs/{source}/replay").json()["id"]
    rerun = api.post(f"/api/v1/projects/{pid}/runs/{source}/rerun").json()["id"]
    scheduler.tick(config)
    finish_run(trained["plane"], replay)
    _, nodes, edges = graph(api, pid, replay)
    assert (source, replay, "replay") in edges
    assert (trained["clean"]["id"], source, "input") in edges
    replay_artifacts = [e for e in edges if e[0] == replay and e[2] == "output"]
    assert len(replay_artifacts) == 1
    _, nodes, edges = graph(api, pid, source)
    assert {(source, replay, "replay"), (source, rerun, "rerun")} <= edges


def test_objects_of_another_project_are_not_found(trained, make_user):  # noqa: F811
    api, pid = trained["api"], trained["pid"]
    version = register(trained)
    other = api.post("/api/v1/projects", json={"name": "another"}).json()
    for object_id in (version["id"], trained["run"]["id"], trained["clean"]["id"], "run_nope"):
        response = api.get(f"/api/v1/projects/{other['id']}/lineage/{object_id}")
        assert (response.status_code, response.json()["error"]) == (404, "not_found")
    stranger = make_user("mallory")
    hidden = stranger.api.get(f"/api/v1/projects/{pid}/lineage/{version['id']}")
    assert hidden.status_code == 404
