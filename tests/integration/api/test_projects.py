"""Projects, members and policy through the real HTTP API, on SQLite and PostgreSQL."""

from __future__ import annotations


def test_create_read_list_project(alice, project):
    assert project["id"].startswith("prj_")
    assert project["state"] == "active" and project["role"] == "admin"
    got = alice.api.get(f"/api/v1/projects/{project['id']}")
    assert got.status_code == 200 and got.json()["name"] == "fraud-models"
    listed = alice.api.get("/api/v1/projects").json()
    assert [p["id"] for p in listed["items"]] == [project["id"]]
    assert listed["next_cursor"] is None


def test_duplicate_project_name_is_a_conflict(alice, project):
    again = alice.api.post("/api/v1/projects", json={"name": "fraud-models"})
    assert again.status_code == 409 and again.json()["error"] == "already_exists"


def test_project_list_paginates_with_a_cursor(alice):
    ids = [
        alice.api.post("/api/v1/projects", json={"name": f"p{i}"}).json()["id"] for i in range(7)
    ]
    seen, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = alice.api.get("/api/v1/projects", params=params).json()
        assert len(page["items"]) <= 3
        seen += [p["id"] for p in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids)
    bad = alice.api.get("/api/v1/projects", params={"cursor": "%%%"})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_cursor"


def test_archived_project_refuses_every_write(alice, project):
    pid = project["id"]
    archived = alice.api.post(f"/api/v1/projects/{pid}/archive")
    assert archived.status_code == 200 and archived.json()["state"] == "archived"
    writes = [
        ("post", f"/api/v1/projects/{pid}/datasets", {"name": "d"}),
        (
            "post",
            f"/api/v1/projects/{pid}/code-refs",
            {"repo_url": "https://git.example/r.git", "commit_sha": "a" * 40},
        ),
        (
            "post",
            f"/api/v1/projects/{pid}/environments",
            {"name": "e", "base_image": "runner", "packages": []},
        ),
        ("put", f"/api/v1/projects/{pid}/members/alice", {"role": "viewer"}),
        ("post", f"/api/v1/projects/{pid}/policy-snapshots", None),
        ("post", f"/api/v1/projects/{pid}/archive", None),
    ]
    for method, url, body in writes:
        response = getattr(alice.api, method)(url, json=body)
        assert response.status_code == 409, (url, response.text)
        assert response.json()["error"] == "project_archived"
    assert alice.api.get(f"/api/v1/projects/{pid}").status_code == 200  # still readable


def test_members_roles_and_last_admin(alice, make_user, project):
    bob = make_user("bob")
    pid = project["id"]
    assert bob.api.get(f"/api/v1/projects/{pid}").status_code == 404
    granted = alice.api.put(f"/api/v1/projects/{pid}/members/bob", json={"role": "viewer"})
    assert granted.status_code == 200 and granted.json() == {"username": "bob", "role": "viewer"}
    assert bob.api.get(f"/api/v1/projects/{pid}").json()["role"] == "viewer"
    members = alice.api.get(f"/api/v1/projects/{pid}/members").json()
    assert members == [
        {"username": "alice", "role": "admin"},
        {"username": "bob", "role": "viewer"},
    ]
    demote = alice.api.put(f"/api/v1/projects/{pid}/members/alice", json={"role": "editor"})
    assert demote.status_code == 409 and demote.json()["error"] == "last_admin"
    assert alice.api.delete(f"/api/v1/projects/{pid}/members/alice").status_code == 409
    assert alice.api.delete(f"/api/v1/projects/{pid}/members/bob").status_code == 204
    assert bob.api.get(f"/api/v1/projects/{pid}").status_code == 404
    unknown = alice.api.put(f"/api/v1/projects/{pid}/members/nobody", json={"role": "viewer"})
    assert unknown.status_code == 404
    wrong = alice.api.put(f"/api/v1/projects/{pid}/members/bob", json={"role": "owner"})
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_request"


def test_policy_is_validated_and_snapshots_are_immutable_copies(alice, project):
    pid = project["id"]
    policy = alice.api.get(f"/api/v1/projects/{pid}/policy").json()
    assert policy["egress"] == {"allow": []}  # no network by default
    first = alice.api.post(f"/api/v1/projects/{pid}/policy-snapshots")
    assert first.status_code == 201
    policy["resources"]["memory_mb"] = 1024
    assert alice.api.put(f"/api/v1/projects/{pid}/policy", json=policy).status_code == 200
    bad = alice.api.put(f"/api/v1/projects/{pid}/policy", json={**policy, "resources": {"cpu": -1}})
    assert bad.status_code == 400 and bad.json()["details"]["errors"]
    snap = alice.api.get(f"/api/v1/projects/{pid}/policy-snapshots/{first.json()['id']}").json()
    assert snap["policy"]["resources"]["memory_mb"] == 4096  # the copy did not follow the change
    assert snap["digest"] == first.json()["digest"]


def test_service_account_token_acts_within_its_project_only(alice, project, server):
    pid = project["id"]
    other = alice.api.post("/api/v1/projects", json={"name": "other"}).json()
    created = alice.api.post(
        f"/api/v1/projects/{pid}/service-accounts", json={"name": "ci-bot", "role": "editor"}
    )
    assert created.status_code == 201, created.text
    account = created.json()
    token = alice.api.post(
        f"/api/v1/projects/{pid}/service-accounts/{account['id']}/tokens", json={"name": "ci"}
    )
    assert token.status_code == 201 and token.json()["token"].startswith("anm_")
    bot = server.client(token.json()["token"])
    assert bot.get("/api/v1/me").json()["actor"] == f"service_account:{pid}/ci-bot"
    assert bot.post(f"/api/v1/projects/{pid}/datasets", json={"name": "d"}).status_code == 201
    assert bot.get(f"/api/v1/projects/{other['id']}").status_code == 404
    assert bot.post("/api/v1/projects", json={"name": "x"}).status_code == 403
    listed = alice.api.get(f"/api/v1/projects/{pid}/service-accounts").json()["items"]
    assert [a["name"] for a in listed] == ["ci-bot"]
