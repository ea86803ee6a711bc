"""``animus``: the command line of the appliance.

Every command reads its settings from the environment (see ``animus config docs``), so the
same command works on the embedded default and on a PostgreSQL installation.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click

from appliance import __version__, db
from appliance.config import Config, ConfigError, settings_markdown
from appliance.domain.context import SYSTEM, Context
from appliance.errors import AnimusError


def reports_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """A command whose AnimusError becomes ``Error: code: message`` and exit status 1,
    never a traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except AnimusError as exc:
            raise click.ClickException(f"{exc.code}: {exc.message}") from None

    return wrapper


def _config() -> Config:
    try:
        return Config.from_env()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _open(config: Config | None = None, *, require_schema: bool = True) -> Config:
    config = config or _config()
    db.bind(db.open_database(config.effective_database_url))
    if require_schema:
        version, newest = db.current_version(), len(db.available_migrations())
        if version != newest:
            raise click.ClickException(
                f"the database schema is at version {version}, this release needs {newest}: "
                "run `animus db upgrade` first"
            )
    return config


def _cli_context() -> Context:
    return Context(principal=SYSTEM, request_id="cli_" + "_".join(sys.argv[1:3])[:60])


_DURATION = re.compile(r"^(\d+)([smhdw]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(_ctx: click.Context | None, _param: click.Parameter | None, text: str) -> int:
    """Click callback: ``90d``, ``12h``, ``30m``, ``3600`` → seconds."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise click.BadParameter("use a number with an optional unit s, m, h, d or w, e.g. 90d")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


class _LazyGroup(click.Group):
    """A group whose heavier subcommands are imported only when one of them runs (or when
    ``--help`` lists them): every `animus db …` an installer runs starts in less time."""

    LAZY: dict[str, str] = {
        "image": "appliance.images.cli:image_group",
        "registry": "appliance.images.cli:registry_group",
        "env": "appliance.images.cli:env_group",
        "bundle": "appliance.bundle.cli:bundle_group",
        "release": "appliance.install.cli:release_group",
        "rollback": "appliance.install.cli:rollback_command",
        "install": "appliance.install.cli:install_group",
        "backup": "appliance.ops.cli:backup_command",
        "restore": "appliance.ops.cli:restore_command",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.LAZY:
            module, _, attribute = self.LAZY[cmd_name].partition(":")
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="animus")
def main() -> None:
    """Animus Datalab: the governed, audited ML laboratory for air-gapped networks.

    Settings come from ANIMUS_* environment variables; `animus config docs` lists them.
    """


# --- serve ------------------------------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=int, help="Port to listen on.")
@click.option(
    "--upgrade/--no-upgrade",
    default=True,
    show_default=True,
    help="Apply pending database migrations before serving.",
)
def serve(host: str, port: int, upgrade: bool) -> None:
    """Run the control plane with the development server (threaded).

    For production use gunicorn with the shipped configuration:
    `gunicorn -c python:appliance.gunicorn_conf 'appliance.app:create_app()'`.
    """
    config = _config()
    if upgrade:
        _open(config, require_schema=False)
        db.upgrade(log=lambda line: click.echo(line, err=True))
    from appliance.app import create_app

    app = create_app(config)
    click.echo(f"animus control plane on http://{host}:{port} (data: {config.data_dir})", err=True)
    app.run(host=host, port=port, threaded=True, use_reloader=False)


# --- db ---------------------------------------------------------------------------------------


@main.group("db")
def db_group() -> None:
    """Database schema: upgrade, downgrade, status."""


@db_group.command("upgrade")
@click.argument("target", required=False, type=int)
def db_upgrade(target: int | None) -> None:
    """Apply pending migrations (up to TARGET, default the newest)."""
    _open(require_schema=False)
    try:
        version = db.upgrade(target=target, log=click.echo)
    except db.MigrationError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"schema at version {version}")


@db_group.command("downgrade")
@click.argument("target", type=int)
def db_downgrade(target: int) -> None:
    """Revert migrations down to version TARGET."""
    _open(require_schema=False)
    try:
        version = db.downgrade(target, log=click.echo)
    except db.MigrationError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"schema at version {version}")


@db_group.command("newest")
def db_newest() -> None:
    """Print the newest schema version this release knows (no database needed)."""
    click.echo(len(db.available_migrations()))


@db_group.command("status")
def db_status() -> None:
    """Print the current and the newest schema version."""
    _open(require_schema=False)
    version, newest = db.current_version(), len(db.available_migrations())
    click.echo(f"schema version {version} (newest {newest})")
    if version != newest:
        sys.exit(1)


# --- admin, tokens ------------------------------------------------------------------------------


@main.group()
def admin() -> None:
    """Bootstrap administration: local users."""


@admin.command("create-user")
@click.argument("username")
@click.option("--system-admin", "role", flag_value="admin", help="Grant the system admin role.")
@click.option("--auditor", "role", flag_value="auditor", help="Grant the system auditor role.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def create_user(username: str, role: str | None, password_stdin: bool) -> None:
    """Create a local user (for bootstrap and break-glass access)."""
    from appliance.auth import identities

    password = None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    _open()
    try:
        user = identities.create_user(_cli_context(), username, password, role)
    except AnimusError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(f"created user {user.username} ({user.id})" + (f" with role {role}" if role else ""))


@main.group()
def token() -> None:
    """API tokens."""


@token.command("create")
@click.option("--user", "username", required=True, help="The user the token acts as.")
@click.option(
    "--ttl",
    "seconds",
    default="30d",
    show_default=True,
    callback=parse_duration,
    help="Lifetime, e.g. 12h, 30d, 1w.",
)
@click.option("--name", default="cli", show_default=True, help="A label to recognise it by.")
def token_create(username: str, seconds: int, name: str) -> None:
    """Issue an API token for USER and print only the token."""
    from appliance.auth import identities

    config = _open()
    if seconds > config.max_token_ttl_seconds:
        raise click.ClickException(
            f"--ttl may be at most {config.max_token_ttl_seconds} seconds "
            "(ANIMUS_MAX_TOKEN_TTL_SECONDS)"
        )
    try:
        user = identities.user_by_name(username)
        _, secret = identities.issue_token(
            _cli_context(), ttl_seconds=seconds, user=user, name=name
        )
    except AnimusError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(secret)


# --- audit --------------------------------------------------------------------------------------


@main.group()
def audit() -> None:
    """The audit chain."""


@audit.command("verify")
def audit_verify() -> None:
    """Verify the whole chain: prints OK, the event count and head hash, or the first broken seq."""
    from appliance.audit import log as audit_log

    _open()
    verdict = audit_log.verify()
    click.echo(str(verdict))
    sys.exit(0 if verdict.ok else 1)


# --- config -------------------------------------------------------------------------------------


@main.group("config")
def config_group() -> None:
    """Settings."""


@config_group.command("docs")
def config_docs() -> None:
    """Print the configuration reference (Markdown)."""
    click.echo(settings_markdown(), nl=False)


@config_group.command("show")
def config_show() -> None:
    """Print the effective settings (the database password is hidden)."""
    config = _config()
    for name, value in vars(config).items():
        if name == "database_url" and value:
            value = re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", value)
        click.echo(f"{name} = {value}")


@main.command()
@click.option("--port", default=8080, show_default=True, type=int, help="Port of the API.")
@click.option("--registry-port", type=int, help="Port of the local registry [default: PORT+1].")
@click.option("--serve", is_flag=True, help="Keep the appliance running after the walk-through.")
def demo(port: int, registry_port: int | None, serve: bool) -> None:
    """Start the appliance on the embedded default and walk the full ML cycle.

    Data goes to ANIMUS_DATA_DIR (default ./.animus-demo).
    """
    from appliance.demo import run_demo

    try:
        run_demo(port=port, registry_port=registry_port or port + 1, serve=serve, say=click.echo)
    except AnimusError as exc:
        raise click.ClickException(exc.message) from None


# --- execution ----------------------------------------------------------------------------------


@main.command()
@click.option(
    "--interval", default=0.05, show_default=True, type=float, help="Seconds between passes."
)
def scheduler(interval: float) -> None:
    """Run the scheduler: plan queued Runs, expire lapsed Data Plane leases."""
    from appliance.execution.scheduler import run_forever

    config = _open()
    db.database.close_all()
    click.echo("animus scheduler running", err=True)
    run_forever(config, interval=interval)


@main.group("dataplane", invoke_without_command=True)
@click.option(
    "--backend",
    type=click.Choice(["runc", "kubernetes"]),
    default="runc",
    show_default=True,
    help="Where Runs execute.",
)
@click.option(
    "--control-plane",
    "control_plane",
    envvar="ANIMUS_CONTROL_PLANE_URL",
    default="http://127.0.0.1:8080",
    show_default=True,
    help="Base URL of the control plane (ANIMUS_CONTROL_PLANE_URL).",
)
@click.option(
    "--capacity", default=4, show_default=True, type=int, help="Runs executed at the same time."
)
@click.option(
    "--work-dir",
    envvar="ANIMUS_DATAPLANE_DIR",
    default=".animus-dataplane",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Workspaces, unpacked images and container state (ANIMUS_DATAPLANE_DIR).",
)
@click.pass_context
def dataplane(
    ctx: click.Context, backend: str, control_plane: str, capacity: int, work_dir: Path
) -> None:
    """Run the Data Plane agent (its credential in ANIMUS_DATAPLANE_TOKEN).

    Register the agent once with `animus dataplane register NAME` on the control plane host.
    """
    if ctx.invoked_subcommand is not None:
        return
    import os

    from appliance import logs
    from appliance.execution.agent import main_loop
    from appliance.execution.runc_backend import RuncBackend
    from appliance.images.registry import RegistryClient

    credential = os.environ.get("ANIMUS_DATAPLANE_TOKEN", "")
    if not credential:
        raise click.ClickException(
            "set ANIMUS_DATAPLANE_TOKEN to the agent's credential "
            "(printed by `animus dataplane register`)"
        )
    config = _config()
    logs.configure(config.log_level)
    if backend == "kubernetes":
        from appliance.execution.kubernetes_backend import make_kubernetes_backend
        from appliance.execution.kubernetes_manifests import KubernetesSettings

        settings = KubernetesSettings.from_env(os.environ)
        chosen = make_kubernetes_backend(
            settings,
            kubeconfig=os.environ.get("ANIMUS_K8S_KUBECONFIG"),
            context=os.environ.get("ANIMUS_K8S_CONTEXT"),
        )
        # Pods mount their workspace from the shared volume, so it is prepared there.
        runs_dir = Path(settings.workspace_mount)
    else:
        if not config.registry_url:
            raise click.ClickException("set ANIMUS_REGISTRY_URL: runs pull their images from it")
        parsed = urlparse(config.registry_url)
        registry = RegistryClient(parsed.netloc, tls=parsed.scheme == "https")
        chosen = RuncBackend(work_dir.absolute() / "runc", registry)
        runs_dir = work_dir.absolute() / "runs"
    click.echo(f"animus dataplane ({backend}) → {control_plane}, capacity {capacity}", err=True)
    main_loop(control_plane, credential, chosen, runs_dir, capacity)


@dataplane.command("render")
@click.option(
    "--backend", type=click.Choice(["kubernetes"]), default="kubernetes", show_default=True
)
@click.option("--run", "run_id", help="A planned Run whose manifests to print.")
@click.option(
    "--namespace",
    "namespace_only",
    is_flag=True,
    help="Print the runs namespace, its default-deny policy and the agent's RBAC.",
)
def dataplane_render(backend: str, run_id: str | None, namespace_only: bool) -> None:
    """Print the Kubernetes manifests that would be applied, for review or
    `kubectl apply --dry-run=server -f -`. Secret values are never printed."""
    import os

    import yaml

    from appliance.execution.kubernetes_manifests import (
        KubernetesSettings,
        namespace_manifests,
        render_manifests,
    )

    settings = KubernetesSettings.from_env(os.environ)
    if namespace_only:
        manifests = namespace_manifests(settings)
    else:
        if not run_id:
            raise click.ClickException("give --run RUN_ID (or --namespace)")
        from appliance.domain.records import ExecutionSnapshot

        _open()
        snapshot = ExecutionSnapshot.get_or_none(ExecutionSnapshot.run_id == run_id)
        if snapshot is None:
            raise click.ClickException(f"run {run_id!r} has no execution snapshot (not planned)")
        try:
            manifests = render_manifests(snapshot.snapshot, settings)
        except AnimusError as exc:
            raise click.ClickException(exc.message) from None
    click.echo(yaml.safe_dump_all(manifests, sort_keys=False), nl=False)


@dataplane.command("register")
@click.argument("name")
@click.option(
    "--backend", type=click.Choice(["runc", "kubernetes"]), default="runc", show_default=True
)
def dataplane_register(name: str, backend: str) -> None:
    """Register a Data Plane agent and print its credential (shown once)."""
    from appliance.auth import identities

    _open()
    try:
        _, secret = identities.register_data_plane(_cli_context(), name, backend)
    except AnimusError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(secret)
