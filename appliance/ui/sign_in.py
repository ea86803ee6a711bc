"""Signing in and out of the web UI, and the pages that answer without a project."""

from __future__ import annotations

from flask import g, redirect, request, url_for

from appliance.api.routing import context
from appliance.auth import identities, sessions
from appliance.domain.context import ANONYMOUS, Context
from appliance.errors import AnimusError, NotFound
from appliance.ui.security import clear_session_cookie, session_policy, set_session_cookie
from appliance.ui.web import bp, page


def _safe_next(target: str | None) -> str:
    """Only a path inside the UI: never another host (an open redirect)."""
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("ui.home")


@bp.get("/")
def home():
    return redirect(url_for("ui.audit_log" if g.principal.is_auditor else "ui.projects_page"))


@bp.route("/sign-in", methods=["GET", "POST"])
def sign_in():
    target = _safe_next(request.values.get("next"))
    if g.get("ui_session") and request.method == "GET":
        return redirect(target)
    if request.method == "GET":
        return page("sign_in.html", next=target)
    username = request.form.get("username", "")[:64]
    password = request.form.get("password", "")[:1024]
    # Whoever is signed in in this browser is not the one signing in: the attempt is
    # anonymous until the password is checked.
    anonymous = Context(ANONYMOUS, g.request_id)
    try:
        user = identities.authenticate_password(
            anonymous, username, password, remote_addr=request.remote_addr or ""
        )
    except AnimusError as error:
        if error.code == "too_many_attempts":
            body, _ = page("sign_in.html", next=target, error=error, username=username)
            return body, 429, {"Retry-After": str(error.details["retry_after_seconds"])}
        return page("sign_in.html", status=401, next=target, error=error, username=username)
    previous = g.get("ui_session")
    if previous is not None:
        # One browser, one session: the one it held ends before the new one starts.
        sessions.end_session(context(), previous.session, reason="signed in again")
    _, secret = sessions.start_session(
        anonymous,
        user,
        session_policy(),
        remote_addr=request.remote_addr or "",
        user_agent=request.headers.get("User-Agent", ""),
    )
    response = redirect(target)
    set_session_cookie(response, secret)
    return response


@bp.post("/sign-out")
def sign_out():
    sessions.end_session(context(), g.ui_session.session)
    response = redirect(url_for("ui.sign_in"))
    clear_session_cookie(response)
    return response


@bp.route("/<path:anything>", methods=["GET", "POST"])
def missing(anything: str):
    raise NotFound("there is no page at this address")
