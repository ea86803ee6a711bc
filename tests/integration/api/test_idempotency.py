"""Idempotency-Key on creating requests (DESIGN §11)."""

from __future__ import annotations

import threading

from appliance.domain.records import AuditEvent, Dataset, Project


def test_repeat_returns_the_first_result_once(server, alice, bound_db):
    headers = {"Idempotency-Key": "create-p-1"}
    first = alice.api.post("/api/v1/projects", json={"name": "p"}, headers=headers)
    again = alice.api.post("/api/v1/projects", json={"name": "p"}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert Project.select().count() == 1
    assert AuditEvent.select().where(AuditEvent.action == "project:record:created").count() == 1


def test_same_key_different_body_is_refused(server, alice):
    headers = {"Idempotency-Key": "k"}
    alice.api.post("/api/v1/projects", json={"name": "p"}, headers=headers)
    other = alice.api.post("/api/v1/projects", json={"name": "q"}, headers=headers)
    assert (other.status_code, other.json()["error"]) == (422, "idempotency_key_reused")


def test_keys_are_per_caller(server, alice, make_user):
    bob = make_user("bob")
    headers = {"Idempotency-Key": "same"}
    assert (
        alice.api.post("/api/v1/projects", json={"name": "a"}, headers=headers).status_code == 201
    )
    assert bob.api.post("/api/v1/projects", json={"name": "b"}, headers=headers).status_code == 201


def test_concurrent_repeats_create_once(server, alice, project, bound_db):
    url = f"/api/v1/projects/{project['id']}/datasets"
    results = []

    def post():
        client = server.client(alice.token)
        results.append(client.post(url, json={"name": "d"}, headers={"Idempotency-Key": "race"}))

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {r.status_code for r in results} == {201}
    assert len({r.json()["id"] for r in results}) == 1
    assert Dataset.select().count() == 1


def test_upload_with_key_is_not_repeated(server, alice, project, bound_db):
    from appliance.domain.records import DatasetVersion

    ds = alice.api.post(f"/api/v1/projects/{project['id']}/datasets", json={"name": "d"}).json()
    url = f"/api/v1/projects/{project['id']}/datasets/{ds['id']}/versions"
    files = [("files", ("a.txt", b"hello"))]
    first = alice.api.post(url, files=files, headers={"Idempotency-Key": "up-1"})
    # A multipart body has a random boundary, so a client repeats the same bytes it sent first.
    again = alice.api.post(
        url,
        data=first.request.body,
        headers={"Idempotency-Key": "up-1", "Content-Type": first.request.headers["Content-Type"]},
    )
    assert first.status_code == 201 and again.json() == first.json()
    assert DatasetVersion.select().count() == 1
