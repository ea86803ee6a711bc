"""Users, service accounts and API tokens: creating them and resolving a token to a principal."""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import UTC, datetime, timedelta

from appliance import db
from appliance.audit import log as audit
from appliance.audit.actions import Action
from appliance.auth import passwords
from appliance.domain.context import Context, Principal
from appliance.domain.records import (
    ApiToken,
    DataPlane,
    Project,
    RoleBinding,
    ServiceAccount,
    SignInFailure,
    User,
    create_named,
    new_id,
    utc_now,
)
from appliance.errors import AnimusError, NotFound, ValidationFailed

USERNAME = re.compile(r"^[a-z][a-z0-9._-]{1,63}$")
DATA_PLANE_TOKEN_PREFIX = "anmdp_"  # noqa: S105 (a prefix, not a secret)
TOKEN_PREFIX = "anm_"  # noqa: S105 (a prefix, not a secret)
SYSTEM_ROLES = ("admin", "auditor")
#: After this many failed sign-ins for one username or one client address within
#: ``THROTTLE_WINDOW``, further attempts for that key are refused until the window passes.
THROTTLE_ATTEMPTS = 5
THROTTLE_WINDOW = timedelta(minutes=15)
#: What a failed sign-in records instead of a username that names no account: the text
#: typed may be a password typed into the wrong field, and the audit chain is permanent.
UNKNOWN_USERNAME = "(no such user)"


def _token_digest(token: str) -> str:
    # Tokens carry 256 random bits, so a fast hash is enough to make the stored value useless.
    return hashlib.sha256(token.encode()).hexdigest()


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def create_user(
    ctx: Context, username: str, password: str | None, system_role: str | None = None
) -> User:
    if not USERNAME.match(username):
        raise ValidationFailed(
            "username must be 2-64 characters: lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter",
            details={"field": "username"},
        )
    if system_role not in (None, *SYSTEM_ROLES):
        raise ValidationFailed(f"unknown system role {system_role!r}", details={"field": "role"})
    if password is not None and len(password) < passwords.MIN_LENGTH:
        raise ValidationFailed(
            f"password must be at least {passwords.MIN_LENGTH} characters",
            details={"field": "password"},
        )
    password_hash = passwords.hash_password(password) if password is not None else None
    with db.write_transaction():
        if User.get_or_none(User.username == username):
            raise AnimusError(f"user {username!r} already exists", code="already_exists")
        user = User.create(
            id=new_id("usr"),
            username=username,
            password_hash=password_hash,
            system_role=system_role,
        )
        audit.record(
            ctx,
            Action.USER_CREATED,
            object_type="user",
            object_id=user.id,
            payload={"username": username, "system_role": system_role},
        )
    return user


def user_by_name(username: str) -> User:
    user = User.get_or_none(User.username == username)
    if user is None:
        raise NotFound(f"no user {username!r}")
    return user


def principal_for_user(user: User, token_id: str | None = None) -> Principal:
    return Principal(
        kind="user",
        id=user.id,
        name=user.username,
        system_role=user.system_role,
        token_id=token_id,
    )


def create_service_account(ctx: Context, project: Project, name: str, role: str) -> ServiceAccount:
    if not USERNAME.match(name):
        raise ValidationFailed(
            "service account name must be 2-64 characters: lowercase letters, digits, '.', '_' "
            "or '-', starting with a letter",
            details={"field": "name"},
        )
    with db.write_transaction():
        account = create_named(
            ServiceAccount,
            "a service account",
            id=new_id("sa"),
            project_id=project.id,
            name=name,
            created_by=ctx.principal.actor,
        )
        RoleBinding.create(
            id=new_id("rb"), project_id=project.id, service_account_id=account.id, role=role
        )
        audit.record(
            ctx,
            Action.SERVICE_ACCOUNT_CREATED,
            project_id=project.id,
            object_type="service_account",
            object_id=account.id,
            payload={"name": name, "role": role},
        )
    return account


def issue_token(
    ctx: Context,
    *,
    ttl_seconds: int,
    user: User | None = None,
    service_account: ServiceAccount | None = None,
    name: str = "",
    session_id: str | None = None,
) -> tuple[ApiToken, str]:
    """Create a token; returns the record and the secret, which is shown once and never stored.

    ``session_id``: the web session issuing a personal token; revoking that session (a
    forced logout) revokes the token too.
    """
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires = _rfc3339(datetime.now(UTC) + timedelta(seconds=ttl_seconds))
    with db.write_transaction():
        token = ApiToken.create(
            id=new_id("tok"),
            token_hash=_token_digest(secret),
            user_id=user.id if user else None,
            service_account_id=service_account.id if service_account else None,
            name=name,
            expires_at=expires,
            session_id=session_id,
        )
        audit.record(
            ctx,
            Action.TOKEN_CREATED,
            project_id=service_account.project_id if service_account else None,
            object_type="api_token",
            object_id=token.id,
            payload={
                "owner": f"user:{user.username}"
                if user
                else f"service_account:{service_account.id}",
                "name": name,
                "expires_at": expires,
                **({"session_id": session_id} if session_id else {}),
            },
        )
    return token, secret


def revoke_token(ctx: Context, token: ApiToken, *, reason: str = "") -> ApiToken:
    """Stop ``token`` working (audited, with ``reason`` when one is given)."""
    with db.write_transaction():
        if token.revoked_at is None:
            token.revoked_at = utc_now()
            ApiToken.update(revoked_at=token.revoked_at).where(ApiToken.id == token.id).execute()
            account = (
                ServiceAccount.get_by_id(token.service_account_id)
                if token.service_account_id
                else None
            )
            audit.record(
                ctx,
                Action.TOKEN_REVOKED,
                project_id=account.project_id if account else None,
                object_type="api_token",
                object_id=token.id,
                payload={"reason": reason} if reason else None,
            )
    return token


def register_data_plane(ctx: Context, name: str, backend: str) -> tuple[DataPlane, str]:
    """Register a Data Plane agent; returns it and its credential (shown once)."""
    if not USERNAME.match(name):
        raise ValidationFailed("a Data Plane name is 2-64 of a-z 0-9 . _ -, starting with a letter")
    secret = DATA_PLANE_TOKEN_PREFIX + secrets.token_urlsafe(32)
    with db.write_transaction():
        if DataPlane.get_or_none(DataPlane.name == name):
            raise AnimusError(f"a Data Plane named {name!r} exists", code="already_exists")
        plane = DataPlane.create(
            id=new_id("dp"), name=name, token_hash=_token_digest(secret), backend=backend
        )
        audit.record(
            ctx,
            Action.DATA_PLANE_REGISTERED,
            object_type="data_plane",
            object_id=plane.id,
            payload={"name": name, "backend": backend},
        )
    return plane, secret


def principal_for_token(secret: str) -> Principal | None:
    """The principal a bearer token stands for, or None if it is unknown, expired or revoked."""
    if secret.startswith(DATA_PLANE_TOKEN_PREFIX) and len(secret) <= 128:
        plane = DataPlane.get_or_none(DataPlane.token_hash == _token_digest(secret))
        if plane is None or plane.revoked_at is not None:
            return None
        return Principal(kind="data_plane", id=plane.id, name=plane.name)
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 128:
        return None
    token = ApiToken.get_or_none(ApiToken.token_hash == _token_digest(secret))
    if token is None or token.revoked_at is not None or token.expires_at <= utc_now():
        return None
    if token.user_id:
        user = User.get_or_none(User.id == token.user_id)
        if user is None or not user.is_active:
            return None
        return principal_for_user(user, token.id)
    account = ServiceAccount.get_or_none(ServiceAccount.id == token.service_account_id)
    if account is None:
        return None
    return Principal(
        kind="service_account",
        id=account.id,
        name=account.name,
        project_id=account.project_id,
        token_id=token.id,
    )


def _throttle_keys(username: str, remote_addr: str) -> list[str]:
    # The username is kept only as a digest: what was typed may be a password.
    keys = ["user:" + hashlib.sha256(username.encode()).hexdigest()]
    if remote_addr:
        keys.append("addr:" + remote_addr[:64])
    return keys


def _throttled_until(keys: list[str], now: datetime) -> datetime | None:
    """When every key of ``keys`` that is over the limit has freed up, or None if none is."""
    since = _rfc3339(now - THROTTLE_WINDOW)
    until: datetime | None = None
    for key in keys:
        recent = list(
            SignInFailure.select(SignInFailure.failed_at)
            .where((SignInFailure.throttle_key == key) & (SignInFailure.failed_at > since))
            .order_by(SignInFailure.failed_at.desc())
            .limit(THROTTLE_ATTEMPTS)
        )
        if len(recent) >= THROTTLE_ATTEMPTS:
            oldest = datetime.strptime(recent[-1].failed_at, "%Y-%m-%dT%H:%M:%S.%fZ")
            free = oldest.replace(tzinfo=UTC) + THROTTLE_WINDOW
            until = free if until is None else max(until, free)
    return until


def authenticate_password(
    ctx: Context, username: str, password: str, *, remote_addr: str = ""
) -> User:
    """Check a username and password; every outcome is audited.

    Refused without checking the password (``too_many_attempts``) while the username or
    ``remote_addr`` has ``THROTTLE_ATTEMPTS`` failures within ``THROTTLE_WINDOW``. The
    failures are kept in the database, so every server process applies the same limit.
    """
    user = User.get_or_none(User.username == username)
    named = (
        {"username": username}
        if user is not None
        else {"username": UNKNOWN_USERNAME, "username_length": len(username)}
    )
    keys = _throttle_keys(username, remote_addr)
    now = datetime.now(UTC)
    blocked_until = _throttled_until(keys, now)
    ok = (
        blocked_until is None
        and passwords.verify_password(password, user.password_hash if user else None)
        and user is not None
        and user.is_active
    )
    with db.write_transaction():
        payload = {**named, "method": "password"}
        if blocked_until is not None:
            payload["reason"] = "throttled"
        audit.record(
            ctx,
            Action.LOGIN_SUCCEEDED if ok else Action.LOGIN_FAILED,
            object_type="user",
            object_id=user.id if user else "",
            payload=payload,
        )
        if ok:
            SignInFailure.delete().where(SignInFailure.throttle_key == keys[0]).execute()
        elif blocked_until is None:
            # Only checked attempts count, so a refused one does not push the window on.
            for key in keys:
                SignInFailure.create(id=new_id("sif"), throttle_key=key, failed_at=_rfc3339(now))
            SignInFailure.delete().where(
                SignInFailure.failed_at <= _rfc3339(now - THROTTLE_WINDOW)
            ).execute()
    if blocked_until is not None:
        wait = max(1, int((blocked_until - now).total_seconds()) + 1)
        raise AnimusError(
            f"too many failed sign-in attempts; try again in {(wait + 59) // 60} minutes",
            code="too_many_attempts",
            details={"retry_after_seconds": wait},
        )
    if not ok:
        raise AnimusError("wrong username or password", code="invalid_credentials")
    return user


def deactivate_user(ctx: Context, user: User) -> User:
    """Switch an account off: its tokens stop working at once and its web sessions end."""
    from appliance.auth.sessions import end_all_sessions

    if ctx.principal.kind == "user" and ctx.principal.id == user.id:
        raise AnimusError("you cannot deactivate your own account", code="invalid_state")
    with db.write_transaction():
        if user.is_active:
            user.is_active = False
            User.update(is_active=False).where(User.id == user.id).execute()
            audit.record(
                ctx,
                Action.USER_DEACTIVATED,
                object_type="user",
                object_id=user.id,
                payload={"username": user.username},
            )
            end_all_sessions(ctx, user, reason="account deactivated")
    return user
