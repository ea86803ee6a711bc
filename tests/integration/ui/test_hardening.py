"""The UI's defences against a hostile client: body limits, caching, cookie planting, session
fixation on sign-in, tokens outliving a forced logout, the upload form's token, query
arguments fed to URL building, and guessing passwords."""

from __future__ import annotations

import html
import io
import re
import time
from urllib.parse import parse_qs

import pytest

from appliance.auth import identities
from appliance.domain.context import Context
from appliance.domain.records import ApiToken, AuditEvent, Session, SignInFailure, User
from tests.integration.ui.conftest import PASSWORD, Browser, make_person, text

FIVE_MB = 5 * 1024 * 1024
HTTPS = "https://appliance.local"


class CountingBody(io.BytesIO):
    """A request body that remembers how much of it the server read."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.consumed = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.consumed += len(chunk)
        return chunk

    def read1(self, size: int | None = -1) -> bytes:
        chunk = super().read1(size)
        self.consumed += len(chunk)
        return chunk

    def readinto(self, buffer) -> int:
        count = super().readinto(buffer)
        self.consumed += count
        return count

    def readline(self, size: int | None = -1) -> bytes:
        chunk = super().readline(size)
        self.consumed += len(chunk)
        return chunk


def multipart(fields: dict[str, bytes], boundary: str = "b0undary") -> bytes:
    """A multipart body; a field named ``file`` is a file part (spooled to disk if parsed)."""
    parts = []
    for name, value in fields.items():
        disposition = f'form-data; name="{name}"'
        if name == "file":
            disposition += '; filename="fill.bin"\r\nContent-Type: application/octet-stream'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n"
        parts.append(head.encode() + value + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def post_body(client, path: str, body: bytes, **kwargs):
    stream = CountingBody(body)
    started = time.monotonic()
    response = client.post(
        path,
        input_stream=stream,
        content_length=len(body),
        content_type="multipart/form-data; boundary=b0undary",
        **kwargs,
    )
    return response, stream, time.monotonic() - started


def new_project(browser: Browser, name: str = "p1") -> str:
    browser.get("/ui/projects")
    response = browser.post("/ui/projects", {"name": name})
    assert response.status_code == 302, text(response)
    return response.headers["Location"]


def new_dataset(browser: Browser, project: str, name: str = "loans") -> str:
    browser.get(f"{project}/datasets")
    response = browser.post(f"{project}/datasets", {"name": name})
    assert response.status_code == 302, text(response)
    return response.headers["Location"]


def upload_action(browser: Browser, dataset_url: str) -> str:
    page = text(browser.get(dataset_url))
    found = re.search(r'enctype="multipart/form-data" class="stack"\s+action="([^"]+)"', page)
    return html.unescape(found.group(1))


def upload(browser: Browser, action: str, content: bytes = b"a,b\n1,2\n", **kwargs):
    return browser.client.post(
        action,
        data={"files": (io.BytesIO(content), "loans.csv")},
        content_type="multipart/form-data",
        **kwargs,
    )


def events(action: str) -> list[AuditEvent]:
    return list(AuditEvent.select().where(AuditEvent.action == action).order_by(AuditEvent.seq))


# --- 1. request bodies are capped before any form is parsed ------------------------------------


def test_a_huge_sign_in_form_is_refused_unread(browser, bound_db):
    body = multipart({"username": b"x", "password": b"p", "file": b"f" * FIVE_MB})
    response, stream, took = post_body(browser.client, "/ui/sign-in", body)
    assert response.status_code == 413
    assert "Too large" in text(response)
    assert stream.consumed == 0, "the body was not read, so nothing was spooled to disk"
    assert took < 2


def test_a_huge_body_to_any_ui_path_is_refused_unread(signed_in):
    body = multipart({"csrf_token": signed_in.token.encode(), "file": b"f" * FIVE_MB})
    for path in ("/ui/projects", "/ui/no/such/page"):
        response, stream, _ = post_body(signed_in.client, path, body)
        assert response.status_code == 413, path
        assert stream.consumed == 0, path


def test_the_upload_is_exempt_from_the_form_limit(signed_in):
    dataset_url = new_dataset(signed_in, new_project(signed_in))
    response = upload(signed_in, upload_action(signed_in, dataset_url), b"x" * (2 << 20))
    assert response.status_code == 302
    assert "/dataset-versions/" in response.headers["Location"]


def test_the_upload_never_reads_its_token_from_the_body(signed_in):
    dataset_url = new_dataset(signed_in, new_project(signed_in))
    action = upload_action(signed_in, dataset_url)
    token = re.search(r"csrf_token=([^&]+)", action).group(1)
    body = multipart({"csrf_token": token.encode(), "file": b"f" * FIVE_MB})
    response, stream, _ = post_body(signed_in.client, f"{dataset_url}/versions", body)
    assert response.status_code == 303
    assert "upload_refused=forbidden" in response.headers["Location"]
    assert stream.consumed == 0


# --- 3. nothing under /ui but the static files is cached ---------------------------------------


def test_downloads_and_pages_are_no_store_and_static_files_are_cacheable(app, signed_in):
    dataset_url = new_dataset(signed_in, new_project(signed_in))
    version_url = upload(signed_in, upload_action(signed_in, dataset_url)).headers["Location"]
    download = signed_in.get(f"{version_url}/files/loans.csv")
    assert download.status_code == 200 and download.data == b"a,b\n1,2\n"
    assert download.headers["Cache-Control"] == "no-store"
    make_person("audrey", "auditor")
    audrey = Browser(app)
    audrey.sign_in("audrey")
    verifier = audrey.get("/ui/audit/verifier")
    assert verifier.status_code == 200
    assert verifier.headers["Cache-Control"] == "no-store"
    assert signed_in.get(dataset_url).headers["Cache-Control"] == "no-store"
    static = signed_in.get("/ui/static/animus.css")
    assert static.status_code == 200 and "no-store" not in static.headers.get("Cache-Control", "")


# --- 4. cookies a sibling subdomain cannot plant -----------------------------------------------


def test_over_https_the_cookies_are_host_prefixed_with_path_root(app, bound_db):
    make_person("carol")
    client = app.test_client()
    page = client.get("/ui/sign-in", base_url=HTTPS)
    login_cookie = page.headers["Set-Cookie"]
    assert login_cookie.startswith("__Host-animus_login_csrf=")
    assert "Secure" in login_cookie and "Path=/;" in login_cookie + ";"
    assert "Domain" not in login_cookie
    token = re.search(r'name="csrf_token" value="([^"]+)"', text(page)).group(1)
    signed = client.post(
        "/ui/sign-in",
        data={"username": "carol", "password": PASSWORD, "csrf_token": token},
        base_url=HTTPS,
    )
    assert signed.status_code == 302
    cookie = next(c for c in signed.headers.getlist("Set-Cookie") if "animus_session=" in c)
    assert cookie.startswith("__Host-animus_session=anms_")
    assert "Secure" in cookie and "HttpOnly" in cookie and "Path=/;" in cookie + ";"
    assert "Domain" not in cookie
    assert client.get("/ui/projects", base_url=HTTPS).status_code == 200


def test_over_https_a_cookie_without_the_prefix_is_ignored(app, bound_db):
    """A sibling subdomain can set ``animus_session`` (not ``__Host-``): it signs nobody in."""
    make_person("carol")
    plain = Browser(app)
    plain.sign_in("carol")
    planted = plain.client.get_cookie("animus_session", path="/ui").value
    victim = app.test_client(use_cookies=False)
    response = victim.get(
        "/ui/projects", base_url=HTTPS, headers={"Cookie": f"animus_session={planted}"}
    )
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/ui/sign-in")
    # The same secret under the name only this host can set is a session (control).
    accepted = victim.get(
        "/ui/projects", base_url=HTTPS, headers={"Cookie": f"__Host-animus_session={planted}"}
    )
    assert accepted.status_code == 200


@pytest.mark.parametrize(
    ("base_url", "name"),
    [(HTTPS, "__Host-animus_session"), ("http://localhost", "animus_session")],
)
def test_a_request_with_two_session_cookies_is_refused(app, bound_db, base_url, name):
    make_person("carol")
    mine = Browser(app)
    mine.sign_in("carol")
    real = mine.client.get_cookie("animus_session", path="/ui").value
    planted = "anms_" + "p" * 43
    client = app.test_client(use_cookies=False)
    response = client.get(
        "/ui/projects", base_url=base_url, headers={"Cookie": f"{name}={planted}; {name}={real}"}
    )
    assert response.status_code == 400
    assert "two copies of one of this site's sign-in cookies" in html.unescape(text(response))


def test_plain_http_keeps_the_plain_cookie_names(app, bound_db):
    make_person("carol")
    response = Browser(app).sign_in("carol")
    cookie = next(c for c in response.headers.getlist("Set-Cookie") if "animus_session=" in c)
    assert cookie.startswith("animus_session=") and "Path=/ui" in cookie


# --- 6. signing in while signed in ------------------------------------------------------------


def test_signing_in_again_ends_the_old_session_and_is_not_done_as_its_user(app, signed_in):
    make_person("bob")
    alice_session = Session.get()
    login_token = signed_in.client.get_cookie("animus_login_csrf", path="/ui").value
    again = signed_in.client.post(
        "/ui/sign-in", data={"username": "bob", "password": PASSWORD, "csrf_token": login_token}
    )
    assert again.status_code == 302
    assert Session.get_by_id(alice_session.id).ended_at is not None
    ended = events("auth:session:ended")[-1]
    assert ended.object_id == alice_session.id and ended.actor == "user:alice"
    assert ended.payload == {"reason": "signed in again", "username": "alice"}
    login = events("auth:login:succeeded")[-1]
    assert login.actor == "anonymous" and login.payload["username"] == "bob"
    started = events("auth:session:started")[-1]
    assert started.actor == "user:bob" and started.seq > ended.seq
    bob = User.get(User.username == "bob")
    live = Session.select().where(Session.ended_at.is_null())
    assert [s.user_id for s in live] == [bob.id]


# --- 2. a forced logout contains what the session minted ---------------------------------------


def test_a_forced_logout_revokes_the_tokens_the_session_issued(app, signed_in):
    signed_in.get("/ui/account")
    issued = signed_in.post("/ui/account/tokens", {"name": "stolen", "days": "7"})
    assert issued.status_code == 201
    secret = re.search(r"(anm_[A-Za-z0-9_-]+)", text(issued)).group(1)
    alice = User.get(User.username == "alice")
    _, cli_secret = identities.issue_token(
        Context(identities.principal_for_user(alice), "cli"),
        ttl_seconds=3600,
        user=alice,
    )
    api = app.test_client()

    def me(token: str) -> int:
        return api.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code

    assert me(secret) == 200
    make_person("root", "admin")
    admin = Browser(app)
    admin.sign_in("root")
    session = Session.get(Session.user_id == alice.id)
    admin.get("/ui/admin/sessions")
    assert admin.post(f"/ui/admin/sessions/{session.id}/revoke").status_code == 302
    assert me(secret) == 401, "the token minted by the revoked session stops working"
    assert me(cli_secret) == 200, "a token issued elsewhere is not the session's"
    minted = ApiToken.get(ApiToken.session_id == session.id)
    revoked = events("identity:token:revoked")
    assert [(e.object_id, e.actor) for e in revoked] == [(minted.id, "user:root")]
    assert revoked[0].payload == {"reason": f"issuing session {session.id} revoked"}


# --- 7. the upload form's token ---------------------------------------------------------------


def test_the_upload_token_is_scoped_to_its_dataset_and_is_not_the_session_token(signed_in):
    project = new_project(signed_in)
    loans = new_dataset(signed_in, project, "loans")
    other = new_dataset(signed_in, project, "other")
    action = upload_action(signed_in, loans)
    token = re.search(r"csrf_token=([^&]+)", action).group(1)
    session_token = Session.get().csrf_token
    assert session_token not in action
    # The session's own token, and another dataset's upload token, are both refused.
    for refused_action in (
        f"{loans}/versions?csrf_token={session_token}",
        f"{other}/versions?csrf_token={token}",
    ):
        response = upload(signed_in, refused_action)
        assert response.status_code == 303, refused_action
        assert "upload_refused=forbidden" in response.headers["Location"]
    assert upload(signed_in, action).status_code == 302


def test_a_cross_site_upload_is_refused_even_with_the_token(signed_in):
    dataset_url = new_dataset(signed_in, new_project(signed_in))
    action = upload_action(signed_in, dataset_url)
    refused = upload(signed_in, action, headers={"Sec-Fetch-Site": "cross-site"})
    assert refused.status_code == 303
    assert upload(signed_in, action, headers={"Sec-Fetch-Site": "same-origin"}).status_code == 302


def test_a_refused_upload_redirects_to_the_dataset_page_and_is_audited(signed_in):
    dataset_url = new_dataset(signed_in, new_project(signed_in))
    refused = upload(signed_in, f"{dataset_url}/versions?csrf_token=forged")
    assert refused.status_code == 303
    assert refused.headers["Location"] == f"{dataset_url}?upload_refused=forbidden"
    shown = signed_in.get(refused.headers["Location"])
    assert shown.status_code == 200 and "security token" in text(shown)
    denial = events("authz:request:denied")[-1]
    assert denial.object_id == f"POST {dataset_url}/versions"
    # A refusal by the domain (an empty upload) redirects too, with its own message.
    empty = signed_in.client.post(
        upload_action(signed_in, dataset_url),
        data={"files": (io.BytesIO(b""), "")},
        content_type="multipart/form-data",
    )
    assert empty.status_code == 303
    assert "upload_refused=" in empty.headers["Location"]
    made_up = signed_in.get(f"{dataset_url}?upload_refused=%3Cb%3Ehello")
    assert "hello" not in text(made_up), "the page shows only text of its own"


# --- 10. query arguments never steer URL building ---------------------------------------------


def test_underscore_and_path_query_arguments_are_dropped_from_page_links(app, signed_in):
    for n in range(55):
        make_person(f"user{n:02d}")
    make_person("audrey", "auditor")
    audrey = Browser(app)
    audrey.sign_in("audrey")
    response = audrey.get("/ui/audit?_method=FOO&_external=1&_anchor=x&_scheme=gopher&action=")
    assert response.status_code == 200
    link = html.unescape(re.search(r'<a href="([^"]+)">Next events', text(response)).group(1))
    path, _, query = link.partition("?")
    assert path == "/ui/audit" and "#" not in link
    assert sorted(parse_qs(query, keep_blank_values=True)) == ["action", "after_seq"]


# --- 11 and the throttle: failed sign-ins -----------------------------------------------------


def test_a_failed_sign_in_never_records_an_unknown_username(browser, bound_db):
    make_person("erin")
    browser.get("/ui/sign-in")
    typed = "Tr0ub4dor&3-password-in-the-wrong-field"
    assert browser.post("/ui/sign-in", {"username": typed, "password": "x"}).status_code == 401
    failed = events("auth:login:failed")[-1]
    assert typed not in failed.canonical
    assert failed.payload == {
        "method": "password",
        "username": identities.UNKNOWN_USERNAME,
        "username_length": len(typed),
    }
    assert all(typed not in row.throttle_key for row in SignInFailure.select())


def test_five_failures_for_one_username_lock_it_for_the_window(app, bound_db):
    make_person("erin")
    attacker = Browser(app)
    attacker.get("/ui/sign-in")
    for _ in range(identities.THROTTLE_ATTEMPTS):
        wrong = attacker.post("/ui/sign-in", {"username": "erin", "password": "guess"})
        assert wrong.status_code == 401
    # Even the right password is refused now, from any address.
    owner = Browser(app)
    owner.get("/ui/sign-in")
    locked = owner.post(
        "/ui/sign-in",
        {"username": "erin", "password": PASSWORD},
        environ_base={"REMOTE_ADDR": "10.9.9.9"},
    )
    assert locked.status_code == 429
    assert "too many failed sign-in attempts" in text(locked)
    assert 0 < int(locked.headers["Retry-After"]) <= 15 * 60
    assert Session.select().count() == 0
    refused = events("auth:login:failed")[-1]
    assert refused.payload == {"method": "password", "reason": "throttled", "username": "erin"}
    # Once the window has passed, the owner signs in.
    SignInFailure.update(failed_at="2000-01-01T00:00:00.000000Z").execute()
    assert owner.post("/ui/sign-in", {"username": "erin", "password": PASSWORD}).status_code == 302


def test_five_failures_from_one_address_lock_that_address(app, bound_db):
    make_person("erin")
    attacker = Browser(app)
    attacker.get("/ui/sign-in")
    for n in range(identities.THROTTLE_ATTEMPTS):
        attacker.post("/ui/sign-in", {"username": f"nobody{n}", "password": "guess"})
    locked = attacker.post("/ui/sign-in", {"username": "erin", "password": PASSWORD})
    assert locked.status_code == 429
    elsewhere = Browser(app)
    elsewhere.get("/ui/sign-in", environ_base={"REMOTE_ADDR": "10.1.1.1"})
    assert (
        elsewhere.post(
            "/ui/sign-in",
            {"username": "erin", "password": PASSWORD},
            environ_base={"REMOTE_ADDR": "10.1.1.1"},
        ).status_code
        == 302
    )


def test_the_api_login_is_throttled_too(app, bound_db):
    make_person("erin")
    api = app.test_client()
    for _ in range(identities.THROTTLE_ATTEMPTS):
        wrong = api.post("/api/v1/auth/login", json={"username": "erin", "password": "guess"})
        assert wrong.status_code == 401
    locked = api.post("/api/v1/auth/login", json={"username": "erin", "password": PASSWORD})
    assert locked.status_code == 429
    assert locked.get_json()["error"] == "too_many_attempts"


def test_schema_5_can_be_restored_with_session_bound_tokens_stored(signed_in, config):
    """Migration 0006 adds ``api_tokens.session_id``; ``animus db downgrade 5`` drops it."""
    from appliance import db
    from tests.integration.test_cli import animus

    signed_in.get("/ui/account")
    assert signed_in.post("/ui/account/tokens", {"name": "laptop"}).status_code == 201
    token_id = ApiToken.get(ApiToken.session_id.is_null(False)).id
    db.database.close()
    down = animus(config, "db", "downgrade", "5")
    assert down.returncode == 0, down.stderr
    assert "reverting 0006" in down.stdout
    up = animus(config, "db", "upgrade")
    assert up.returncode == 0, up.stderr
    db.database.connect(reuse_if_open=True)
    kept = ApiToken.get_by_id(token_id)
    assert kept.session_id is None, "the token survives; its session link went with 0006"
