"""/api/v1 identity: password login, the caller's own tokens, and user administration."""

from __future__ import annotations

from flask import Blueprint, current_app, request

from appliance.api import schemas as s
from appliance.api.pages import QUERY, page, page_schema
from appliance.api.routing import context, operation
from appliance.auth import identities
from appliance.auth.rbac import Decision, Permission, decide
from appliance.domain.context import Context
from appliance.domain.records import ApiToken, ServiceAccount, User
from appliance.errors import Forbidden, Hidden, NotFound, ValidationFailed

bp = Blueprint("identity", __name__, url_prefix="/api/v1")
TAG = "identity"

TOKEN_REQUEST = s.body({}, {"name": s.NAME, "ttl_seconds": {"type": "integer", "minimum": 60}})


def render_user(user: User) -> dict:
    return {
        "id": user.id,
        "username": user.username,
        "system_role": user.system_role,
        "is_active": user.is_active,
        "created_at": user.created_at,
    }


def render_token(token: ApiToken, secret: str | None = None) -> dict:
    if token.user_id:
        owner = "user:" + User.get_by_id(token.user_id).username
    else:
        owner = "service_account:" + token.service_account_id
    rendered = {
        "id": token.id,
        "name": token.name,
        "owner": owner,
        "created_at": token.created_at,
        "expires_at": token.expires_at,
        "revoked_at": token.revoked_at,
    }
    if secret is not None:
        rendered["token"] = secret
    return rendered


def _ttl(body: dict) -> int:
    config = current_app.config["ANIMUS"]
    ttl = body.get("ttl_seconds", config.token_ttl_seconds)
    if ttl > config.max_token_ttl_seconds:
        raise ValidationFailed(
            f"ttl_seconds may be at most {config.max_token_ttl_seconds}",
            details={"field": "ttl_seconds"},
        )
    return ttl


def issue_token_response(
    ctx: Context,
    body: dict,
    *,
    user: User | None = None,
    service_account: ServiceAccount | None = None,
) -> dict:
    token, secret = identities.issue_token(
        ctx,
        ttl_seconds=_ttl(body),
        user=user,
        service_account=service_account,
        name=body.get("name", ""),
    )
    return render_token(token, secret)


@operation(
    bp,
    "POST",
    "/auth/login",
    summary="Exchange a username and password for an API token",
    tag=TAG,
    public=True,
    body=s.body(
        {
            "username": {"type": "string", "maxLength": 64},
            "password": {"type": "string", "maxLength": 1024},
        },
        {"ttl_seconds": {"type": "integer", "minimum": 60}},
    ),
    response=s.TOKEN,
    status=201,
    errors=(400, 401, 429),
)
def login(body):
    ctx = context()
    user = identities.authenticate_password(
        ctx, body["username"], body["password"], remote_addr=request.remote_addr or ""
    )
    principal_ctx = Context(identities.principal_for_user(user), ctx.request_id)
    return issue_token_response(principal_ctx, {"name": "login", **body}, user=user)


@operation(
    bp,
    "GET",
    "/me",
    summary="Who the caller is",
    tag=TAG,
    response=s.obj({"actor": {"type": "string"}, "kind": {"type": "string"}}),
)
def me():
    principal = context().principal
    return {
        "actor": principal.actor,
        "kind": principal.kind,
        "username": principal.name,
        "system_role": principal.system_role,
        "project_id": principal.project_id,
    }


def _own_user() -> User:
    principal = context().principal
    if principal.kind != "user":
        raise Forbidden(
            "only users have personal tokens; service account tokens are managed "
            "by the project's admins"
        )
    return User.get_by_id(principal.id)


@operation(
    bp,
    "POST",
    "/tokens",
    summary="Issue a personal API token (the secret is returned once)",
    tag=TAG,
    body=TOKEN_REQUEST,
    response=s.TOKEN,
    status=201,
    errors=(400, 403),
)
def create_token(body):
    return issue_token_response(context(), body, user=_own_user())


@operation(
    bp,
    "GET",
    "/tokens",
    summary="List the caller's personal tokens",
    tag=TAG,
    query=QUERY,
    response=page_schema(s.TOKEN),
    errors=(403,),
)
def list_tokens():
    user = _own_user()

    def fetch(after, limit):
        query = ApiToken.select().where(ApiToken.user_id == user.id)
        if after:
            query = query.where(ApiToken.id > after)
        return query.order_by(ApiToken.id).limit(limit)

    return page(fetch, render_token)


@operation(
    bp,
    "DELETE",
    "/tokens/<token_id>",
    summary="Revoke a token: your own, or any token as a system admin",
    tag=TAG,
    response=s.TOKEN,
    errors=(404,),
)
def revoke_token(token_id):
    ctx = context()
    token = ApiToken.get_or_none(ApiToken.id == token_id)
    own = token is not None and ctx.principal.kind == "user" and token.user_id == ctx.principal.id
    if token is None:
        raise NotFound(f"no token {token_id!r}")
    if not (own or ctx.principal.is_system_admin):
        raise Hidden(f"no token {token_id!r}")
    return render_token(identities.revoke_token(ctx, token))


def _require(permission: Permission) -> Context:
    ctx = context()
    if decide(ctx.principal, permission) is not Decision.ALLOW:
        raise Forbidden("this needs the system admin role")
    return ctx


@operation(
    bp,
    "POST",
    "/users",
    summary="Create a local user (system admins)",
    tag=TAG,
    body=s.body(
        {"username": {"type": "string", "maxLength": 64}},
        {
            "password": {"type": "string", "maxLength": 1024},
            "system_role": {"enum": ["admin", "auditor", None]},
        },
    ),
    response=s.USER,
    status=201,
    idempotent=True,
    errors=(400, 403, 409, 422),
)
def create_user(body):
    ctx = _require(Permission.USERS_MANAGE)
    user = identities.create_user(
        ctx, body["username"], body.get("password"), body.get("system_role")
    )
    return render_user(user)


@operation(
    bp,
    "GET",
    "/users",
    summary="List users (system admins)",
    tag=TAG,
    query=QUERY,
    response=page_schema(s.USER),
    errors=(403,),
)
def list_users():
    _require(Permission.USERS_MANAGE)

    def fetch(after, limit):
        query = User.select()
        if after:
            query = query.where(User.id > after)
        return query.order_by(User.id).limit(limit)

    return page(fetch, render_user)


@operation(
    bp,
    "GET",
    "/users/<username>",
    summary="Get a user (system admins)",
    tag=TAG,
    response=s.USER,
    errors=(403, 404),
)
def get_user(username):
    _require(Permission.USERS_MANAGE)
    return render_user(identities.user_by_name(username))
