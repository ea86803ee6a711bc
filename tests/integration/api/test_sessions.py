"""/api/v1/sessions: system admins see live web UI sessions and force them to log out."""

from __future__ import annotations

from appliance.domain.records import AuditEvent
from tests.integration.ui.conftest import Browser, make_person


def test_a_system_admin_lists_and_ends_a_browser_session(app, server, make_user, bound_db):
    make_person("alice")
    browser = Browser(app)
    browser.sign_in("alice")
    root = make_user("root", "admin")
    listed = root.api.get("/api/v1/sessions")
    assert listed.status_code == 200
    (session,) = listed.json()
    assert session["username"] == "alice" and session["ended_at"] is None
    ended = root.api.delete(f"/api/v1/sessions/{session['id']}")
    assert ended.status_code == 200
    assert ended.json()["end_reason"] == "forced logout"
    assert browser.get("/ui/projects").status_code == 302, "the browser is signed out"
    assert root.api.get("/api/v1/sessions").json() == []
    event = AuditEvent.get(AuditEvent.action == "auth:session:revoked")
    assert event.actor == "user:root" and event.object_id == session["id"]
    assert root.api.delete("/api/v1/sessions/ses_0000").status_code == 404


def test_other_callers_are_refused_and_audited(app, server, make_user, bound_db):
    make_person("alice")
    browser = Browser(app)
    browser.sign_in("alice")
    bob = make_user("bob")
    assert bob.api.get("/api/v1/sessions").status_code == 403
    session_id = make_user("root", "admin").api.get("/api/v1/sessions").json()[0]["id"]
    refused = bob.api.delete(f"/api/v1/sessions/{session_id}")
    assert refused.status_code == 403
    denial = AuditEvent.get(AuditEvent.action == "authz:request:denied")
    assert denial.actor == "user:bob"
    assert browser.get("/ui/projects").status_code == 200
