"""Server-side web UI sessions (DESIGN §8): TTL, idle timeout, forced logout, parallel limit.

The browser holds only a random secret in an HttpOnly cookie; the database holds its SHA-256,
the user, a CSRF token and the session's times. Starting, ending and revoking a session are
audited in the same transaction as the change.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from appliance import db
from appliance.audit import log as audit
from appliance.audit.actions import Action
from appliance.auth.identities import principal_for_user, revoke_token
from appliance.domain.context import Context, Principal
from appliance.domain.records import ApiToken, Session, User, new_id, utc_now
from appliance.errors import NotFound

SECRET_PREFIX = "anms_"  # noqa: S105 (a prefix, not a secret)
_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


@dataclass(frozen=True)
class SessionPolicy:
    ttl_seconds: int
    idle_seconds: int
    max_per_user: int


@dataclass(frozen=True)
class ActiveSession:
    session: Session
    user: User
    principal: Principal


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _at(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(_FORMAT)


def _parse(text: str) -> datetime:
    return datetime.strptime(text, _FORMAT).replace(tzinfo=UTC)


def start_session(
    ctx: Context, user: User, policy: SessionPolicy, *, remote_addr: str = "", user_agent: str = ""
) -> tuple[Session, str]:
    """Open a session for ``user``; returns it and its secret (sent once, as the cookie).

    When the user already holds ``max_per_user`` live sessions, the oldest end first.
    """
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    actor_ctx = Context(principal_for_user(user), ctx.request_id)
    with db.write_transaction():
        live = list(
            Session.select()
            .where((Session.user_id == user.id) & Session.ended_at.is_null())
            .order_by(Session.created_at, Session.id)
        )
        live = [s for s in live if _alive(s, policy, now)]
        for old in live[: max(0, len(live) - policy.max_per_user + 1)]:
            _end(actor_ctx, old, Action.SESSION_REVOKED, reason="session limit reached")
        session = Session.create(
            id=new_id("ses"),
            token_hash=_digest(secret),
            user_id=user.id,
            csrf_token=secrets.token_urlsafe(32),
            created_at=_at(now),
            last_seen_at=_at(now),
            expires_at=_at(now + timedelta(seconds=policy.ttl_seconds)),
            remote_addr=remote_addr[:64],
            user_agent=user_agent[:256],
        )
        audit.record(
            actor_ctx,
            Action.SESSION_STARTED,
            object_type="session",
            object_id=session.id,
            payload={
                "username": user.username,
                "expires_at": session.expires_at,
                "remote_addr": session.remote_addr,
            },
        )
    return session, secret


def _alive(session: Session, policy: SessionPolicy, now: datetime) -> bool:
    if session.ended_at is not None or _parse(session.expires_at) <= now:
        return False
    return _parse(session.last_seen_at) + timedelta(seconds=policy.idle_seconds) > now


def resume_session(secret: str, policy: SessionPolicy) -> ActiveSession | None:
    """The live session ``secret`` belongs to, or None (unknown, ended, expired or idle).

    Marks the session as seen; the write is skipped when it was seen moments ago, so a busy
    page does not turn every read into a write.
    """
    if not secret.startswith(SECRET_PREFIX) or len(secret) > 128:
        return None
    session = Session.get_or_none(Session.token_hash == _digest(secret))
    now = datetime.now(UTC)
    if session is None or not _alive(session, policy, now):
        return None
    user = User.get_or_none(User.id == session.user_id)
    if user is None or not user.is_active:
        return None
    quiet = (now - _parse(session.last_seen_at)).total_seconds()
    if quiet > min(60, policy.idle_seconds / 10):
        session.last_seen_at = _at(now)
        with db.write_transaction():
            Session.update(last_seen_at=session.last_seen_at).where(
                (Session.id == session.id) & Session.ended_at.is_null()
            ).execute()
    return ActiveSession(session, user, principal_for_user(user))


def _end(ctx: Context, session: Session, action: Action, *, reason: str) -> None:
    session.ended_at = utc_now()
    session.ended_by = ctx.principal.actor
    session.end_reason = reason
    Session.update(ended_at=session.ended_at, ended_by=session.ended_by, end_reason=reason).where(
        Session.id == session.id
    ).execute()
    user = User.get_or_none(User.id == session.user_id)
    audit.record(
        ctx,
        action,
        object_type="session",
        object_id=session.id,
        payload={"username": user.username if user else "", "reason": reason},
    )


def end_session(ctx: Context, session: Session, *, reason: str = "signed out") -> None:
    """Sign out: the session's owner ends it."""
    with db.write_transaction():
        current = Session.get_by_id(session.id)
        if current.ended_at is None:
            _end(ctx, current, Action.SESSION_ENDED, reason=reason)


def revoke_session(ctx: Context, session_id: str) -> Session:
    """Forced logout by a system admin; the caller has checked the role.

    The personal API tokens the session issued are revoked with it (each audited): whoever
    held the session must not keep its access through a token it minted.
    """
    with db.write_transaction():
        session = Session.get_or_none(Session.id == session_id)
        if session is None:
            raise NotFound(f"no session {session_id!r}")
        if session.ended_at is None:
            _end(ctx, session, Action.SESSION_REVOKED, reason="forced logout")
        minted = ApiToken.select().where(
            (ApiToken.session_id == session.id) & ApiToken.revoked_at.is_null()
        )
        for token in minted:
            revoke_token(ctx, token, reason=f"issuing session {session.id} revoked")
    return session


def end_all_sessions(ctx: Context, user: User, reason: str) -> int:
    """End every open session of ``user``, in the caller's transaction."""
    count = 0
    for session in Session.select().where(
        (Session.user_id == user.id) & Session.ended_at.is_null()
    ):
        _end(ctx, session, Action.SESSION_REVOKED, reason=reason)
        count += 1
    return count


def live_sessions(
    policy: SessionPolicy, *, user_id: str | None = None, limit: int = 200
) -> list[tuple[Session, User]]:
    """Sessions that have not ended, expired or gone idle, newest first."""
    now = datetime.now(UTC)
    idle_cut = _at(now - timedelta(seconds=policy.idle_seconds))
    query = (
        Session.select(Session, User)
        .join(User, on=(Session.user_id == User.id), attr="user")
        .where(
            Session.ended_at.is_null()
            & (Session.expires_at > _at(now))
            & (Session.last_seen_at > idle_cut)
        )
    )
    if user_id is not None:
        query = query.where(Session.user_id == user_id)
    return [(s, s.user) for s in query.order_by(Session.created_at.desc()).limit(limit)]
