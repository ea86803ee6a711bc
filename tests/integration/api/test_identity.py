"""Login, tokens and users through the HTTP API."""

from __future__ import annotations

from appliance.auth import identities
from appliance.domain.context import SYSTEM, Context
from appliance.domain.records import ApiToken

CTX = Context(SYSTEM, "test")


def test_password_login_issues_a_token_and_both_outcomes_are_audited(server, bound_db, make_user):
    identities.create_user(CTX, "carol", "correct horse battery")
    anonymous = server.client()
    wrong = anonymous.post("/api/v1/auth/login", json={"username": "carol", "password": "nope"})
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_credentials"
    unknown = anonymous.post("/api/v1/auth/login", json={"username": "zed", "password": "nope"})
    assert unknown.json()["message"] == wrong.json()["message"]  # no user enumeration
    ok = anonymous.post(
        "/api/v1/auth/login", json={"username": "carol", "password": "correct horse battery"}
    )
    assert ok.status_code == 201
    token = ok.json()["token"]
    assert server.client(token).get("/api/v1/me").json()["actor"] == "user:carol"
    auditor = make_user("audra", "auditor")
    actions = [
        e["action"] for e in auditor.api.get("/api/v1/audit-events?limit=500").json()["items"]
    ]
    assert actions.count("auth:login:failed") == 2 and actions.count("auth:login:succeeded") == 1
    events = auditor.api.get("/api/v1/audit-events?limit=500").text
    assert token not in events and "correct horse" not in events


def test_tokens_expire_and_revoke(server, alice):
    created = alice.api.post("/api/v1/tokens", json={"name": "laptop", "ttl_seconds": 3600})
    assert created.status_code == 201
    token = created.json()
    client = server.client(token["token"])
    assert client.get("/api/v1/me").status_code == 200
    listed = alice.api.get("/api/v1/tokens").json()["items"]
    assert token["id"] in [t["id"] for t in listed] and all("token" not in t for t in listed)
    assert alice.api.delete(f"/api/v1/tokens/{token['id']}").json()["revoked_at"]
    refused = client.get("/api/v1/me")
    assert refused.status_code == 401 and refused.json()["error"] == "unauthenticated"
    too_long = alice.api.post("/api/v1/tokens", json={"ttl_seconds": 10**9})
    assert too_long.status_code == 422


def test_expired_token_is_refused(server, bound_db, alice):
    user = identities.user_by_name("alice")
    _, secret = identities.issue_token(CTX, ttl_seconds=3600, user=user)
    ApiToken.update(expires_at="2000-01-01T00:00:00.000000Z").where(
        ApiToken.token_hash == identities._token_digest(secret)
    ).execute()
    assert server.client(secret).get("/api/v1/me").status_code == 401


def test_only_system_admins_manage_users(make_user, alice):
    root = make_user("root", "admin")
    created = root.api.post("/api/v1/users", json={"username": "dave", "password": "x" * 12})
    assert created.status_code == 201 and created.json()["username"] == "dave"
    assert "password" not in created.text
    assert alice.api.post("/api/v1/users", json={"username": "eve"}).status_code == 403
    short = root.api.post("/api/v1/users", json={"username": "eve", "password": "short"})
    assert short.status_code == 422
    listed = root.api.get("/api/v1/users").json()["items"]
    assert {"alice", "root", "dave"} <= {u["username"] for u in listed}
