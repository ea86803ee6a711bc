"""The web UI's security properties: headers, CSRF, cookies, escaping, refusals, sessions."""

from __future__ import annotations

import re
import time

import pytest

from appliance.app import create_app
from appliance.config import Config
from appliance.domain.records import AuditEvent, Dataset, Project, Session, User
from tests.integration.ui.conftest import Browser, make_person, text

STRICT_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def denials() -> list[AuditEvent]:
    return list(AuditEvent.select().where(AuditEvent.action == "authz:request:denied"))


def new_project(browser: Browser, name: str = "p1", description: str = "") -> str:
    browser.get("/ui/projects")
    response = browser.post("/ui/projects", {"name": name, "description": description})
    assert response.status_code == 302, text(response)
    return response.headers["Location"]


def test_every_ui_response_carries_the_strict_headers(signed_in):
    project = new_project(signed_in)
    responses = [
        signed_in.get("/ui/sign-in"),
        signed_in.get(project),
        signed_in.get("/ui/no/such/page"),
        signed_in.get("/ui/static/animus.css"),
        signed_in.get("/ui/static/animus.js"),
        signed_in.post("/ui/projects", {"name": "x"}, csrf=False),
        Browser(signed_in.client.application).get("/ui/projects"),  # redirect to sign-in
    ]
    for response in responses:
        assert response.headers["Content-Security-Policy"] == STRICT_CSP, response.request.path
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_pages_have_no_inline_script_style_or_handlers(signed_in):
    project = new_project(signed_in)
    for path in (
        "/ui/sign-in",
        "/ui/projects",
        project,
        f"{project}/runs",
        f"{project}/datasets",
        f"{project}/members",
        "/ui/account",
        "/ui/missing-page",
    ):
        body = text(signed_in.get(path))
        assert "<style" not in body and " style=" not in body, path
        assert not re.search(r"<script(?![^>]*\bsrc=)", body), path
        assert not re.search(r"\son[a-z]+=", body), path
        for url in re.findall(r'(?:src|href|action)="([^"]+)"', body):
            assert url.startswith(("/ui", "#")), (path, url)


def test_a_form_without_the_csrf_token_is_refused_and_audited(signed_in):
    refused = signed_in.post("/ui/projects", {"name": "forged"}, csrf=False)
    assert refused.status_code == 403
    assert "security token" in text(refused)
    wrong = signed_in.post("/ui/projects", {"name": "forged", "csrf_token": "x" * 43})
    assert wrong.status_code == 403
    assert Project.select().where(Project.name == "forged").count() == 0
    events = denials()
    assert len(events) == 2
    assert events[0].actor == "user:alice" and events[0].object_id == "POST /ui/projects"


def test_the_sign_in_form_needs_its_double_submit_token(browser, bound_db):
    make_person("bob")
    # No cookie and no token: a cross-site login attempt.
    response = browser.client.post(
        "/ui/sign-in", data={"username": "bob", "password": "correct horse battery"}
    )
    assert response.status_code == 403
    assert Session.select().count() == 0


def test_cookies_are_httponly_samesite_strict_and_secure_over_https(app, bound_db):
    make_person("carol")
    plain = Browser(app)
    response = plain.sign_in("carol")
    cookie = next(c for c in response.headers.getlist("Set-Cookie") if "animus_session=" in c)
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie
    secure = Browser(app)
    secure.client = app.test_client()
    page = secure.client.get("/ui/sign-in", base_url="https://appliance.local")
    token = re.search(r'name="csrf_token" value="([^"]+)"', text(page)).group(1)
    assert "Secure" in page.headers["Set-Cookie"]
    response = secure.client.post(
        "/ui/sign-in",
        data={"username": "carol", "password": "correct horse battery", "csrf_token": token},
        base_url="https://appliance.local",
    )
    cookie = next(c for c in response.headers.getlist("Set-Cookie") if "animus_session=" in c)
    assert "Secure" in cookie and "HttpOnly" in cookie


def test_user_text_is_escaped(signed_in):
    project = new_project(signed_in, description='<script src="//evil"></script>"><img>')
    body = text(signed_in.get(project))
    assert '<script src="//evil">' not in body
    assert "&lt;script src=&#34;//evil&#34;&gt;&lt;/script&gt;&#34;&gt;&lt;img&gt;" in body


def test_unknown_and_hidden_pages_answer_404_pages(app, signed_in):
    assert signed_in.get("/ui/nothing/here").status_code == 404
    make_person("mallory")
    other = Browser(app)
    other.sign_in("mallory")
    project = new_project(other, "secret-project")
    hidden = signed_in.get(project)
    assert hidden.status_code == 404
    assert "secret-project" not in text(hidden)
    # A write into a project alice cannot see is a 404 too, and audited as a denial.
    refused = signed_in.post(f"{project}/datasets", {"name": "x"})
    assert refused.status_code == 404
    assert denials()[-1].object_id == f"POST {project}/datasets"


def test_signed_out_visitors_are_sent_to_sign_in_and_never_elsewhere(browser, bound_db):
    response = browser.get("/ui/projects?x=1")
    assert response.status_code == 302
    assert response.headers["Location"] == "/ui/sign-in?next=/ui/projects?x%3D1"
    make_person("dave")
    browser.get("/ui/sign-in")
    away = browser.post(
        "/ui/sign-in",
        {"username": "dave", "password": "correct horse battery", "next": "//evil.example/"},
    )
    assert away.headers["Location"] == "/ui/"


def test_a_wrong_password_is_refused_and_audited(browser, bound_db):
    make_person("erin")
    browser.get("/ui/sign-in")
    response = browser.post("/ui/sign-in", {"username": "erin", "password": "not the password"})
    assert response.status_code == 401
    assert "wrong username or password" in text(response)
    assert "animus_session=" not in "".join(response.headers.getlist("Set-Cookie"))
    failed = AuditEvent.get(AuditEvent.action == "auth:login:failed")
    assert failed.payload == {"method": "password", "username": "erin"}


# --- the viewer --------------------------------------------------------------------------------


@pytest.fixture
def viewer_world(app, signed_in):
    """alice's project, in which victor is a viewer."""
    project = new_project(signed_in, "shared")
    signed_in.get(f"{project}/datasets")
    signed_in.post(f"{project}/datasets", {"name": "loans"})
    make_person("victor")
    signed_in.get(f"{project}/members")
    assert (
        signed_in.post(f"{project}/members", {"username": "victor", "role": "viewer"}).status_code
        == 302
    )
    victor = Browser(app)
    victor.sign_in("victor")
    return project, victor


def test_a_viewer_sees_no_write_controls(viewer_world):
    project, victor = viewer_world
    dataset = Dataset.get(Dataset.name == "loans")
    for path in (
        project,
        f"{project}/datasets",
        f"{project}/datasets/{dataset.id}",
        f"{project}/code",
        f"{project}/environments",
        f"{project}/runs",
        f"{project}/pipelines",
        f"{project}/models",
        f"{project}/members",
        f"{project}/policy",
    ):
        body = text(victor.get(path))
        forms = re.findall(r'<form method="post" action="([^"]+)"', body)
        assert forms == ["/ui/sign-out"], (path, forms)
        assert 'type="file"' not in body, path


def test_a_viewer_posting_the_forms_anyway_is_refused_and_audited(viewer_world):
    project, victor = viewer_world
    attempts = {
        f"{project}/datasets": {"name": "sneaky"},
        f"{project}/code": {"repo_url": "https://g.example/r.git", "revision": "a" * 40},
        f"{project}/models": {"name": "sneaky"},
        f"{project}/members": {"username": "victor", "role": "admin"},
        f"{project}/policy": {"policy": "{}"},
    }
    for path, form in attempts.items():
        response = victor.post(path, form)
        assert response.status_code == 403, (path, text(response)[:500])
        assert "Not allowed" in text(response)
    assert Dataset.select().where(Dataset.name == "sneaky").count() == 0
    refused = [e for e in denials() if e.actor == "user:victor"]
    assert sorted(e.object_id for e in refused) == sorted(f"POST {p}" for p in attempts)
    assert all(e.payload == {"code": "forbidden", "status": 403} for e in refused)


# --- sessions ----------------------------------------------------------------------------------


def test_signing_out_ends_the_session_for_good(signed_in):
    cookie = signed_in.client.get_cookie("animus_session", path="/ui").value
    signed_in.get("/ui/projects")
    assert signed_in.post("/ui/sign-out").status_code == 302
    replay = Browser(signed_in.client.application)
    replay.client.set_cookie("animus_session", cookie, path="/ui")
    assert replay.get("/ui/projects").status_code == 302
    ended = AuditEvent.get(AuditEvent.action == "auth:session:ended")
    assert ended.payload == {"reason": "signed out", "username": "alice"}
    assert Session.get().ended_at is not None


def live_session_of(username: str) -> Session:
    user = User.get(User.username == username)
    return Session.get((Session.user_id == user.id) & Session.ended_at.is_null())


def test_an_admin_forces_a_logout(app, signed_in):
    make_person("root", "admin")
    admin = Browser(app)
    admin.sign_in("root")
    target = live_session_of("alice")
    action = f"/ui/admin/sessions/{target.id}/revoke"
    assert action in text(admin.get("/ui/admin/sessions"))
    assert admin.post(action).status_code == 302
    assert signed_in.get("/ui/projects").status_code == 302, "alice is signed out"
    revoked = AuditEvent.get(AuditEvent.action == "auth:session:revoked")
    assert revoked.actor == "user:root" and revoked.payload["reason"] == "forced logout"
    assert admin.get("/ui/admin/sessions").status_code == 200, "root's own session lives on"


def test_a_plain_user_cannot_reach_admin_pages(signed_in, app):
    make_person("bob")
    bob = Browser(app)
    bob.sign_in("bob")
    bob_session = live_session_of("bob")
    for path in ("/ui/admin/users", "/ui/admin/sessions", "/ui/admin/health", "/ui/audit"):
        assert signed_in.get(path).status_code == 403, path
    refused = signed_in.post(f"/ui/admin/sessions/{bob_session.id}/revoke")
    assert refused.status_code == 403
    assert denials()[-1].object_id == f"POST /ui/admin/sessions/{bob_session.id}/revoke"
    assert bob.get("/ui/projects").status_code == 200, "bob's session lives on"


@pytest.fixture
def strict_app(tmp_path, database_url):
    """The appliance with a 1-second idle timeout and at most two sessions per user."""
    config = Config.from_env(
        {},
        data_dir=str(tmp_path / "strict"),
        database_url=database_url,
        blob_fsync="0",
        log_level="WARNING",
        session_idle_seconds="2",
        max_sessions_per_user="2",
    )
    application = create_app(config)
    yield application
    from appliance import db

    if not db.database.is_closed():
        db.database.close()
    db.database.obj.close_all()


def test_an_idle_session_ends(strict_app):
    from appliance import db

    db.database.connect(reuse_if_open=True)
    make_person("ivy")
    ivy = Browser(strict_app)
    ivy.sign_in("ivy")
    assert ivy.get("/ui/projects").status_code == 200
    time.sleep(2.5)
    assert ivy.get("/ui/projects").status_code == 302


def test_a_third_parallel_session_ends_the_oldest(strict_app):
    from appliance import db

    db.database.connect(reuse_if_open=True)
    make_person("pat")
    first, second, third = Browser(strict_app), Browser(strict_app), Browser(strict_app)
    first.sign_in("pat")
    second.sign_in("pat")
    third.sign_in("pat")
    assert first.get("/ui/projects").status_code == 302
    assert second.get("/ui/projects").status_code == 200
    assert third.get("/ui/projects").status_code == 200
    revoked = AuditEvent.get(AuditEvent.action == "auth:session:revoked")
    assert revoked.payload["reason"] == "session limit reached"


def test_the_start_page_leads_each_person_to_their_work(app, signed_in):
    assert signed_in.get("/ui/").headers["Location"] == "/ui/projects"
    make_person("audrey", "auditor")
    auditor = Browser(app)
    auditor.sign_in("audrey")
    assert auditor.get("/ui/").headers["Location"] == "/ui/audit"


def test_a_personal_token_is_shown_once_works_and_can_be_revoked(app, signed_in):
    signed_in.get("/ui/account")
    issued = signed_in.post("/ui/account/tokens", {"name": "laptop", "days": "7"})
    assert issued.status_code == 201
    secret = re.search(r"(anm_[A-Za-z0-9_-]+)", text(issued)).group(1)
    api = app.test_client()
    me = api.get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"})
    assert me.status_code == 200 and me.get_json()["username"] == "alice"
    page = text(signed_in.get("/ui/account"))
    assert secret not in page, "the secret is never shown again"
    revoke = re.search(r'action="(/ui/account/tokens/tok_[0-9a-z]+/revoke)"', page).group(1)
    assert signed_in.post(revoke).status_code == 302
    assert api.get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    too_long = signed_in.post("/ui/account/tokens", {"days": "100000"})
    assert too_long.status_code == 422


def test_deactivating_a_user_ends_their_sessions(app, signed_in):
    make_person("root", "admin")
    admin = Browser(app)
    admin.sign_in("root")
    alice = User.get(User.username == "alice")
    page = text(admin.get("/ui/admin/users"))
    action = f"/ui/admin/users/{alice.id}/deactivate"
    assert action in page
    root = User.get(User.username == "root")
    assert f"/ui/admin/users/{root.id}/deactivate" not in page, "no button to lock yourself out"
    assert admin.post(action).status_code == 302
    assert signed_in.get("/ui/projects").status_code == 302
    assert AuditEvent.get(AuditEvent.action == "identity:user:deactivated").actor == "user:root"
    ended = AuditEvent.get(AuditEvent.action == "auth:session:revoked")
    assert ended.payload == {"reason": "account deactivated", "username": "alice"}
    again = Browser(app)
    again.get("/ui/sign-in")
    refused = again.post("/ui/sign-in", {"username": "alice", "password": "correct horse battery"})
    assert refused.status_code == 401
