"""Pages for project admins (members, service accounts and tokens, policy, project audit) and
system admins (users, sessions with forced logout, system health)."""

from __future__ import annotations

import json

import peewee
import requests
from flask import current_app, g, redirect, request, url_for

from appliance.api.routing import context
from appliance.app import readiness
from appliance.auth import identities, sessions
from appliance.auth.rbac import ROLES, Permission
from appliance.domain import projects
from appliance.domain.records import (
    ApiToken,
    AuditEvent,
    DataPlane,
    RoleBinding,
    Run,
    ServiceAccount,
    Session,
    User,
    utc_now,
)
from appliance.errors import AnimusError, NotFound
from appliance.ui.security import session_policy
from appliance.ui.web import (
    bp,
    config,
    field,
    form_error,
    load_project,
    newest_first,
    page,
    require,
)

# --- members ----------------------------------------------------------------------------------


@bp.get("/projects/<project_id>/members")
def members_page(project_id, error: AnimusError | None = None, **values):
    view = load_project(project_id)
    return page(
        "members.html",
        members=projects.members(view.project),
        roles=ROLES,
        error=error,
        **values,
    )


@bp.post("/projects/<project_id>/members")
def set_member(project_id):
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_ADMIN)
    try:
        projects.set_member(
            ctx, view.project, field("username", limit=64).strip(), field("role", limit=16)
        )
    except AnimusError as error:
        return form_error(members_page, error, project_id=project_id, inline_not_found=True)
    return redirect(url_for("ui.members_page", project_id=project_id))


@bp.post("/projects/<project_id>/members/<username>/remove")
def remove_member(project_id, username):
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_ADMIN)
    try:
        projects.remove_member(ctx, view.project, username)
    except AnimusError as error:
        return form_error(members_page, error, project_id=project_id, inline_not_found=True)
    return redirect(url_for("ui.members_page", project_id=project_id))


# --- service accounts and tokens ----------------------------------------------------------------


@bp.get("/projects/<project_id>/service-accounts")
def service_accounts_page(project_id, error: AnimusError | None = None, **values):
    view = load_project(project_id, Permission.PROJECT_ADMIN)
    accounts = list(
        ServiceAccount.select()
        .where(ServiceAccount.project_id == view.project.id)
        .order_by(ServiceAccount.name)
        .limit(200)
    )
    roles = {
        b.service_account_id: b.role
        for b in RoleBinding.select().where(
            (RoleBinding.project_id == view.project.id)
            & RoleBinding.service_account_id.is_null(False)
        )
    }
    tokens = list(
        ApiToken.select()
        .where(ApiToken.service_account_id.in_([a.id for a in accounts] or [""]))
        .order_by(ApiToken.created_at.desc())
        .limit(500)
    )
    return page(
        "service_accounts.html",
        accounts=accounts,
        account_roles=roles,
        names={a.id: a.name for a in accounts},
        tokens=tokens,
        roles=ROLES,
        error=error,
        **values,
    )


@bp.post("/projects/<project_id>/service-accounts")
def create_service_account(project_id):
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_ADMIN)
    try:
        identities.create_service_account(
            ctx, view.project, field("name", limit=64).strip(), field("role", limit=16)
        )
    except AnimusError as error:
        return form_error(service_accounts_page, error, project_id=project_id)
    return redirect(url_for("ui.service_accounts_page", project_id=project_id))


def _account(project_id: str, account_id: str) -> ServiceAccount:
    account = ServiceAccount.get_or_none(
        (ServiceAccount.id == account_id) & (ServiceAccount.project_id == project_id)
    )
    if account is None:
        raise NotFound(f"no service account {account_id!r} in this project")
    return account


@bp.post("/projects/<project_id>/service-accounts/<account_id>/tokens")
def issue_service_account_token(project_id, account_id):
    """Issue a token; its secret is shown on this one response and never again."""
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_ADMIN)
    account = _account(view.project.id, account_id)
    try:
        days = int(request.form.get("days", "30") or "30")
        ttl = days * 86400
        if days < 1 or ttl > config().max_token_ttl_seconds:
            raise AnimusError(
                f"a token may live from 1 to {config().max_token_ttl_seconds // 86400} days",
                code="validation_failed",
            )
        token, secret = identities.issue_token(
            ctx,
            ttl_seconds=ttl,
            service_account=account,
            name=field("name", required=False, limit=100).strip(),
        )
    except ValueError:
        return form_error(
            service_accounts_page,
            AnimusError("days must be a whole number", code="validation_failed"),
            project_id=project_id,
        )
    except AnimusError as error:
        return form_error(service_accounts_page, error, project_id=project_id)
    body, _ = service_accounts_page(
        project_id, new_token={"secret": secret, "account": account.name, "id": token.id}
    )
    return body, 201


@bp.post("/projects/<project_id>/tokens/<token_id>/revoke")
def revoke_service_account_token(project_id, token_id):
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_ADMIN)
    token = ApiToken.get_or_none(ApiToken.id == token_id)
    if token is None or token.service_account_id is None:
        raise NotFound(f"no token {token_id!r} in this project")
    _account(view.project.id, token.service_account_id)
    identities.revoke_token(ctx, token)
    return redirect(url_for("ui.service_accounts_page", project_id=project_id))


# --- policy -----------------------------------------------------------------------------------


@bp.get("/projects/<project_id>/policy")
def policy_page(project_id, error: AnimusError | None = None, **values):
    view = load_project(project_id)
    values.setdefault("policy_text", json.dumps(view.project.policy, indent=2, sort_keys=True))
    return page("policy.html", error=error, **values)


@bp.post("/projects/<project_id>/policy")
def set_policy(project_id):
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_ADMIN)
    text = request.form.get("policy", "")
    try:
        try:
            policy = json.loads(field("policy", limit=100_000))
        except ValueError as exc:
            raise AnimusError(
                f"the policy is not valid JSON: {exc}", code="invalid_request"
            ) from None
        projects.set_policy(ctx, view.project, policy)
    except AnimusError as error:
        return form_error(policy_page, error, project_id=project_id, policy_text=text)
    return redirect(url_for("ui.policy_page", project_id=project_id))


@bp.get("/projects/<project_id>/audit")
def project_audit(project_id):
    view = load_project(project_id, Permission.PROJECT_AUDIT_READ)
    from appliance.ui.audit import events_page

    return events_page(AuditEvent.project_id == view.project.id, scope=view.project.name)


# --- system admin -----------------------------------------------------------------------------


@bp.get("/admin/users")
def users_page(error: AnimusError | None = None, **values):
    require(Permission.USERS_MANAGE, "managing users needs the system admin role")
    rows, older = newest_first(User.select(), User.id)
    return page("users.html", users=rows, older=older, error=error, **values)


@bp.post("/admin/users")
def create_user(error: AnimusError | None = None):
    require(Permission.USERS_MANAGE, "managing users needs the system admin role")
    role = request.form.get("system_role") or None
    try:
        identities.create_user(
            context(),
            field("username", limit=64).strip(),
            request.form.get("password") or None,
            role,
        )
    except AnimusError as error:
        return form_error(users_page, error, username=request.form.get("username", ""))
    return redirect(url_for("ui.users_page"))


@bp.post("/admin/users/<user_id>/deactivate")
def deactivate_user(user_id):
    require(Permission.USERS_MANAGE, "managing users needs the system admin role")
    user = User.get_or_none(User.id == user_id)
    if user is None:
        raise NotFound(f"no user {user_id!r}")
    try:
        identities.deactivate_user(context(), user)
    except AnimusError as error:
        return form_error(users_page, error)
    return redirect(url_for("ui.users_page"))


@bp.get("/admin/sessions")
def sessions_page():
    require(Permission.USERS_MANAGE, "managing sessions needs the system admin role")
    return page(
        "sessions.html",
        live=sessions.live_sessions(session_policy()),
        current=g.ui_session.session.id,
        policy=session_policy(),
    )


@bp.post("/admin/sessions/<session_id>/revoke")
def revoke_session(session_id):
    require(Permission.USERS_MANAGE, "managing sessions needs the system admin role")
    sessions.revoke_session(context(), session_id)
    return redirect(url_for("ui.sessions_page"))


@bp.get("/account")
def account(error: AnimusError | None = None, **values):
    """The signed-in user's own live sessions and personal API tokens."""
    tokens = list(
        ApiToken.select()
        .where(ApiToken.user_id == g.principal.id)
        .order_by(ApiToken.created_at.desc())
        .limit(200)
    )
    return page(
        "account.html",
        live=sessions.live_sessions(session_policy(), user_id=g.principal.id),
        current=g.ui_session.session.id,
        tokens=tokens,
        now=utc_now(),
        error=error,
        **values,
    )


@bp.post("/account/tokens")
def issue_personal_token():
    """A personal API token for the CLI and scripts; its secret is shown on this page once."""
    try:
        days = request.form.get("days", "30") or "30"
        if not days.isdigit() or not 1 <= int(days) <= config().max_token_ttl_seconds // 86400:
            raise AnimusError(
                f"a token may live from 1 to {config().max_token_ttl_seconds // 86400} days",
                code="validation_failed",
            )
        token, secret = identities.issue_token(
            context(),
            ttl_seconds=int(days) * 86400,
            user=User.get_by_id(g.principal.id),
            name=field("name", required=False, limit=100).strip(),
            session_id=g.ui_session.session.id,
        )
    except AnimusError as error:
        return form_error(account, error)
    body, _ = account(new_token={"secret": secret, "id": token.id})
    return body, 201


@bp.post("/account/tokens/<token_id>/revoke")
def revoke_personal_token(token_id):
    token = ApiToken.get_or_none((ApiToken.id == token_id) & (ApiToken.user_id == g.principal.id))
    if token is None:
        raise NotFound(f"no token {token_id!r}")
    identities.revoke_token(context(), token)
    return redirect(url_for("ui.account"))


@bp.post("/account/sessions/<session_id>/end")
def end_own_session(session_id):
    found = Session.get_or_none((Session.id == session_id) & (Session.user_id == g.principal.id))
    if found is None:
        raise NotFound(f"no session {session_id!r}")
    sessions.end_session(context(), found)
    return redirect(url_for("ui.account"))


def _registry_status() -> dict:
    url = config().registry_url
    if not url:
        return {"ok": False, "detail": "no registry configured (ANIMUS_REGISTRY_URL)"}
    try:
        answer = requests.get(url.rstrip("/") + "/v2/", timeout=2)
    except requests.RequestException as exc:
        return {"ok": False, "detail": f"unreachable: {type(exc).__name__}", "url": url}
    return {
        "ok": answer.status_code in (200, 401),
        "detail": f"answers HTTP {answer.status_code}",
        "url": url,
    }


@bp.get("/admin/health")
def health():
    require(Permission.USERS_MANAGE, "system health needs the system admin role")
    planes = list(DataPlane.select().order_by(DataPlane.name).limit(200))
    held = dict(
        Run.select(Run.data_plane_id, peewee.fn.COUNT(Run.id))
        .where(Run.state.in_(["planned", "running", "unknown", "reconciling"]))
        .group_by(Run.data_plane_id)
        .tuples()
    )
    queue = dict(
        Run.select(Run.state, peewee.fn.COUNT(Run.id))
        .where(Run.state.in_(["created", "queued", "planned", "running", "unknown", "reconciling"]))
        .group_by(Run.state)
        .tuples()
    )
    return page(
        "health.html",
        checks=readiness(current_app),
        registry=_registry_status(),
        planes=planes,
        held=held,
        queue=queue,
        live_sessions=len(sessions.live_sessions(session_policy(), limit=10_000)),
    )
