"""The web UI's security: session cookie, CSRF tokens, security headers and error pages.

- The session cookie holds only a random secret (server-side sessions, ``auth.sessions``);
  it is HttpOnly and SameSite=Strict. Over HTTPS it is Secure and named with the
  ``__Host-`` prefix (Path=/, no Domain), so a sibling subdomain cannot plant one; over
  plain HTTP (loopback demos) it keeps its plain name, scoped to /ui. A request carrying
  two session cookies is refused rather than guessing which one is real.
- Every POST carries a CSRF token: the session's own (synchronizer token), or, on the
  sign-in form where there is no session yet, a double-submit cookie. A dataset upload
  streams its body, so its token travels in the URL: a token derived from the session's
  and the dataset id, good for that one upload form only. A browser's Sec-Fetch-Site, when
  sent, must say same-origin.
- Request bodies are capped (``FORM_BODY_LIMIT``) before any form is parsed, except the
  upload, which streams under its own limits and never parses form fields.
- Every /ui response carries a strict Content-Security-Policy (no inline script or style,
  nothing from another origin), ``Cache-Control: no-store`` (pages, downloads) except the
  static files, and the usual hardening headers.
- A refused mutation is audited through the same path as the API's (``audit_denial``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets

import peewee
from flask import Flask, Response, g, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException

from appliance.api.routing import audit_denial
from appliance.auth import sessions
from appliance.errors import AnimusError, Forbidden, Hidden
from appliance.ui.web import bp, config

log = logging.getLogger("appliance.ui")

SESSION_COOKIE = "animus_session"
LOGIN_CSRF_COOKIE = "animus_login_csrf"
COOKIE_PATH = "/ui"
#: Over HTTPS the cookies carry this prefix: the browser then only accepts them Secure,
#: from this host, with Path=/ and no Domain, so a sibling subdomain cannot set them.
HOST_PREFIX = "__Host-"
#: The largest body a UI request other than a dataset upload may send (forms are small).
FORM_BODY_LIMIT = 1 << 20
#: Endpoints that answer without a session.
PUBLIC = frozenset({"ui.sign_in", "ui.static", "ui.missing"})

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}


def session_policy() -> sessions.SessionPolicy:
    settings = config()
    return sessions.SessionPolicy(
        ttl_seconds=settings.session_ttl_seconds,
        idle_seconds=settings.session_idle_seconds,
        max_per_user=settings.max_sessions_per_user,
    )


def secure_cookies() -> bool:
    setting = config().session_cookie_secure
    return request.is_secure if setting == "auto" else setting == "1"


def cookie_name(base: str) -> str:
    """``base``, with the ``__Host-`` prefix when the cookies are Secure."""
    return HOST_PREFIX + base if secure_cookies() else base


def cookie_path() -> str:
    # __Host- cookies must have Path=/; without the prefix the cookie stays within /ui.
    return "/" if secure_cookies() else COOKIE_PATH


def set_session_cookie(response: Response, secret: str) -> None:
    response.set_cookie(
        cookie_name(SESSION_COOKIE),
        secret,
        max_age=config().session_ttl_seconds,
        path=cookie_path(),
        secure=secure_cookies(),
        httponly=True,
        samesite="Strict",
    )


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(
        cookie_name(SESSION_COOKIE),
        path=cookie_path(),
        secure=secure_cookies(),
        httponly=True,
        samesite="Strict",
    )


def _single_cookie(base: str) -> str:
    """The one value of cookie ``base`` (empty if absent); two copies are refused."""
    values = request.cookies.getlist(cookie_name(base))
    if len(values) > 1:
        raise AnimusError(
            "the browser sent two copies of one of this site's sign-in cookies; "
            "clear this site's cookies and sign in again",
            code="invalid_request",
        )
    return values[0] if values else ""


def login_csrf_token() -> str:
    """The sign-in form's token: the double-submit cookie's value (made on first view)."""
    token = request.cookies.get(cookie_name(LOGIN_CSRF_COOKIE), "")
    if len(token) < 32 or len(token) > 64:
        token = g.get("new_login_csrf") or secrets.token_urlsafe(32)
        g.new_login_csrf = token
    return token


def csrf_token() -> str:
    active = g.get("ui_session")
    return active.session.csrf_token if active else login_csrf_token()


def _same(a: str, b: str) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())


def upload_token(dataset_id: str) -> str:
    """The CSRF token of one dataset's upload form, carried in its action URL.

    Derived from the session's token and the dataset id, so a URL that leaks (history, a
    proxy's log) is good for that one upload in that one session, and never reveals the
    session's own token, which every other form uses.
    """
    active = g.get("ui_session")
    if active is None:
        return ""
    mac = hmac.new(
        active.session.csrf_token.encode(), f"upload:{dataset_id}".encode(), hashlib.sha256
    ).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


UPLOAD_ENDPOINTS = frozenset({"ui.upload_version"})


def is_upload() -> bool:
    return request.endpoint in UPLOAD_ENDPOINTS


def check_csrf() -> None:
    refused = Forbidden(
        "the form's security token is missing or out of date; reload the page and try again"
    )
    # Browsers say where a request came from; our own forms are always same-origin.
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site != "same-origin":
        raise refused
    if is_upload():
        # The upload's body is files only and is streamed: never parse it for a token.
        sent = request.args.get("csrf_token", "")
        expected = upload_token((request.view_args or {}).get("dataset_id", ""))
    elif request.endpoint == "ui.sign_in":
        sent = request.form.get("csrf_token", "")
        expected = _single_cookie(LOGIN_CSRF_COOKIE)
    else:
        sent = request.form.get("csrf_token", "")
        active = g.get("ui_session")
        expected = active.session.csrf_token if active else ""
    if not _same(sent, expected):
        raise refused


@bp.before_request
def resume() -> Response | None:
    if not is_upload():
        # Before anything reads the body: a form is small, and nobody may make the server
        # spool a large body to disk, signed in or not.
        request.max_content_length = FORM_BODY_LIMIT
    secret = _single_cookie(SESSION_COOKIE)
    active = sessions.resume_session(secret, session_policy()) if secret else None
    if active is not None:
        g.ui_session = active
        g.principal = active.principal
    elif secret:
        g.drop_session_cookie = True
    if active is None and request.endpoint not in PUBLIC:
        if request.method == "GET":
            return redirect(url_for("ui.sign_in", next=request.full_path.rstrip("?")))
        raise AnimusError("your session has ended; sign in again", code="unauthenticated")
    if request.method == "POST":
        check_csrf()
    return None


def _headers(response: Response) -> Response:
    if not request.path.startswith("/ui"):
        return response
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    if request.endpoint != "ui.static":
        # Overwrite: send_file says no-cache (store, then revalidate), but no page or
        # download may be kept by any cache, the browser's disk or a shared proxy.
        response.headers["Cache-Control"] = "no-store"
    if g.get("drop_session_cookie"):
        clear_session_cookie(response)
    token = g.get("new_login_csrf")
    if token:
        response.set_cookie(
            cookie_name(LOGIN_CSRF_COOKIE),
            token,
            path=cookie_path(),
            secure=secure_cookies(),
            httponly=True,
            samesite="Strict",
        )
    return response


def error_page(status: int, title: str, message: str) -> tuple[str, int]:
    return render_template("ui/error.html", status=status, title=title, message=message), status


_TITLES = {
    400: "The request is not valid",
    401: "Please sign in",
    403: "Not allowed",
    404: "Not found",
    405: "Not allowed here",
    409: "Conflict",
    413: "Too large",
    422: "Not accepted",
    500: "Something went wrong",
    503: "Unavailable",
}


def upload_refused(error: AnimusError) -> Response:
    """Back to the dataset's page (303) with the refusal's code, never a page at the upload
    URL: that URL carries the form's token and must not become a page in the history."""
    args = request.view_args or {}
    return redirect(
        url_for(
            "ui.dataset",
            project_id=args.get("project_id", ""),
            dataset_id=args.get("dataset_id", ""),
            upload_refused=error.code,
        ),
        code=303,
    )


@bp.errorhandler(AnimusError)
def animus_error(error: AnimusError):
    if isinstance(error, Forbidden | Hidden):
        audit_denial(error)
    if is_upload() and request.view_args:
        return upload_refused(error)
    if error.code == "unauthenticated":
        body, status = error_page(401, _TITLES[401], error.message)
        return body, status
    return error_page(error.status, _TITLES.get(error.status, "Error"), error.message)


@bp.errorhandler(HTTPException)
def http_error(error: HTTPException):
    status = error.code or 500
    return error_page(status, _TITLES.get(status, error.name), error.description or error.name)


@bp.errorhandler(peewee.IntegrityError)
def integrity_error(error: peewee.IntegrityError):
    if "immutable" in str(error):
        return error_page(409, _TITLES[409], "the record is immutable")
    log.exception("integrity error")
    return error_page(409, _TITLES[409], "the change conflicts with stored records")


@bp.errorhandler(Exception)
def unexpected(error: Exception):
    log.exception("unhandled error in the UI")
    return error_page(500, _TITLES[500], "an internal error occurred; the request id is below")


def init_app(app: Flask) -> None:
    app.after_request(_headers)
