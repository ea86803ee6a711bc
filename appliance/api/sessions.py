"""/api/v1/sessions: the web UI's live sessions, and forced logout (system admins)."""

from __future__ import annotations

from flask import Blueprint, current_app

from appliance.api import schemas as s
from appliance.api.routing import context, operation
from appliance.auth import sessions
from appliance.auth.rbac import Decision, Permission, decide
from appliance.domain.records import Session, User
from appliance.errors import Forbidden

bp = Blueprint("sessions", __name__, url_prefix="/api/v1")
TAG = "identity"

SESSION = s.obj(
    {
        "id": s.ID,
        "username": {"type": "string"},
        "created_at": s.TIME,
        "last_seen_at": s.TIME,
        "expires_at": s.TIME,
        "remote_addr": {"type": "string"},
        "user_agent": {"type": "string"},
        "ended_at": {"type": ["string", "null"]},
        "end_reason": {"type": ["string", "null"]},
    }
)


def render_session(session: Session, user: User) -> dict:
    return {
        "id": session.id,
        "username": user.username,
        "created_at": session.created_at,
        "last_seen_at": session.last_seen_at,
        "expires_at": session.expires_at,
        "remote_addr": session.remote_addr,
        "user_agent": session.user_agent,
        "ended_at": session.ended_at,
        "end_reason": session.end_reason,
    }


def _policy() -> sessions.SessionPolicy:
    config = current_app.config["ANIMUS"]
    return sessions.SessionPolicy(
        config.session_ttl_seconds, config.session_idle_seconds, config.max_sessions_per_user
    )


def _admin():
    ctx = context()
    if decide(ctx.principal, Permission.USERS_MANAGE) is not Decision.ALLOW:
        raise Forbidden("managing sessions needs the system admin role")
    return ctx


@operation(
    bp,
    "GET",
    "/sessions",
    summary="Live web UI sessions, newest first (system admins)",
    tag=TAG,
    response={"type": "array", "items": SESSION},
    errors=(403,),
)
def list_sessions():
    _admin()
    return [render_session(session, user) for session, user in sessions.live_sessions(_policy())]


@operation(
    bp,
    "DELETE",
    "/sessions/<session_id>",
    summary="Force a web UI session to log out (system admins; audited)",
    tag=TAG,
    response=SESSION,
    errors=(403, 404),
)
def revoke_session(session_id):
    session = sessions.revoke_session(_admin(), session_id)
    return render_session(session, User.get_by_id(session.user_id))
