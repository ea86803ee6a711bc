"""``animus image …``, ``animus registry …`` and ``animus env …``.

The top-level ``animus`` group loads these groups when one of them runs. Commands print
progress on stderr and results on stdout (``--json`` where a machine reads them).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from appliance.cli import reports_errors
from appliance.errors import AnimusError
from appliance.images.build import build_image
from appliance.images.definition import load_definition
from appliance.images.envbuild import build_environment, load_environment_definition
from appliance.images.layout import Layout
from appliance.images.lock import lock_image
from appliance.images.packages import cache_dir
from appliance.images.progress import StreamProgress
from appliance.images.registry import (
    DEFAULT_WORKERS,
    RegistryClient,
    parse_reference,
    pull_image,
    push_image,
    verify_image,
)
from appliance.images.registry_server import RegistrySettings, serve_foreground
from appliance.images.unpack import pull_and_unpack


def _registry_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--ca-file",
            envvar="ANIMUS_REGISTRY_CA_FILE",
            type=click.Path(exists=True, dir_okay=False),
            help="Use TLS and trust this CA (the registry's generated tls/ca.crt).",
        ),
        click.option("--username", envvar="ANIMUS_REGISTRY_USERNAME", help="htpasswd user."),
        click.option(
            "--password",
            envvar="ANIMUS_REGISTRY_PASSWORD",
            help="Password (prefer the ANIMUS_REGISTRY_PASSWORD variable).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _client(registry: str, ca_file: str | None, username: str | None, password: str | None):
    return RegistryClient(
        registry, tls=ca_file is not None, ca_file=ca_file, username=username, password=password
    )


@click.group("image")
def image_group() -> None:
    """Build, push and verify reproducible OCI images."""


@image_group.command("lock")
@click.argument("definition", type=click.Path(exists=True, file_okay=False, path_type=Path))
@reports_errors
def lock_command(definition: Path) -> None:
    """Pin DEFINITION's Debian packages and wheels into image.lock.json (needs package
    sources: run on a build host)."""
    lock = lock_image(load_definition(definition), StreamProgress())
    click.echo(f"{definition / 'image.lock.json'} {lock.digest}")


@image_group.command("build")
@click.argument("definition", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--output",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="OCI image layout directory to write.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@reports_errors
def build_command(definition: Path, output: Path, as_json: bool) -> None:
    """Build DEFINITION into an OCI image layout, reproducibly and without a daemon."""
    built = build_image(load_definition(definition), output, progress=StreamProgress())
    if as_json:
        click.echo(
            json.dumps(
                {
                    "layout": str(built.layout),
                    "manifest_digest": built.manifest_digest,
                    "compressed_size": built.compressed_size,
                    "layers": built.layers,
                }
            )
        )
    else:
        click.echo(built.manifest_digest)


@image_group.command("push")
@click.argument("layout", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("target")
@click.option(
    "--workers", default=DEFAULT_WORKERS, show_default=True, help="Blobs uploaded in parallel."
)
@_registry_options
@reports_errors
def push_command(
    layout: Path,
    target: str,
    workers: int,
    ca_file: str | None,
    username: str | None,
    password: str | None,
) -> None:
    """Push the image in LAYOUT to TARGET (REGISTRY/REPO[:TAG]) by digest. Prints
    REGISTRY/REPO@sha256:… ; a TAG is set after the digest push and never replaces it."""
    reference = parse_reference(target)
    if reference.digest:
        raise AnimusError(
            "the push target takes a tag at most; the digest is the image's", code="invalid_request"
        )
    source = Layout(layout)
    result = push_image(
        source,
        source.image(),
        _client(reference.registry, ca_file, username, password),
        reference.repository,
        tag=reference.tag,
        workers=workers,
        progress=StreamProgress(),
    )
    click.echo(result.reference)


@image_group.command("verify")
@click.argument("reference")
@_registry_options
@reports_errors
def verify_command(
    reference: str, ca_file: str | None, username: str | None, password: str | None
) -> None:
    """Re-hash every blob of REFERENCE (REGISTRY/REPO@sha256:…) in the registry."""
    ref = parse_reference(reference)
    checks = verify_image(ref, _client(ref.registry, ca_file, username, password), StreamProgress())
    click.echo(f"verified {ref.pinned()}: {len(checks)} blobs intact")


@image_group.command("pull")
@click.argument("reference")
@click.option("--unpack", is_flag=True, help="Also unpack into the cached root filesystem.")
@_registry_options
@reports_errors
def pull_command(
    reference: str,
    unpack: bool,
    ca_file: str | None,
    username: str | None,
    password: str | None,
) -> None:
    """Pull REFERENCE (REGISTRY/REPO@sha256:…) into the cache, verifying every blob; with
    --unpack, print the root filesystem path runc would use."""
    ref = parse_reference(reference)
    client = _client(ref.registry, ca_file, username, password)
    if unpack:
        _, rootfs = pull_and_unpack(reference, client, progress=StreamProgress())
        click.echo(rootfs)
    else:
        image = pull_image(ref, client, Layout(cache_dir() / "oci"), progress=StreamProgress())
        click.echo(image.manifest_digest)


@click.group("registry")
def registry_group() -> None:
    """Run the local OCI registry."""


@registry_group.command("serve")
@click.option(
    "--state-dir",
    envvar="ANIMUS_REGISTRY_DIR",
    default="/var/lib/animus/registry",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option(
    "--listen",
    envvar="ANIMUS_REGISTRY_LISTEN",
    default="127.0.0.1:5000",
    show_default=True,
    help="host:port; loopback unless serving a cluster.",
)
@click.option("--tls", is_flag=True, help="Serve HTTPS with a generated CA (for a cluster).")
@click.option(
    "--hostname", "hostnames", multiple=True, help="Name or IP the certificate is for (repeatable)."
)
@click.option(
    "--user",
    "username",
    envvar="ANIMUS_REGISTRY_USERNAME",
    help="Require htpasswd auth for this user.",
)
@click.option("--password", envvar="ANIMUS_REGISTRY_PASSWORD", help="The user's password.")
@reports_errors
def serve_command(
    state_dir: Path,
    listen: str,
    tls: bool,
    hostnames: tuple[str, ...],
    username: str | None,
    password: str | None,
) -> None:
    """Run the registry in the foreground."""
    host = listen.rsplit(":", 1)[0]
    if not tls and host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        raise click.UsageError("a registry reachable from other hosts must use --tls")
    if tls and not username:
        raise click.UsageError("a TLS (cluster) registry needs --user and a password")
    if username and not password:
        password = click.prompt("registry password", hide_input=True, confirmation_prompt=True)
    settings = RegistrySettings(
        state_dir=state_dir,
        listen=listen,
        tls=tls,
        hostnames=hostnames or (host,),
        users={username: password} if username and password else {},
    )
    if tls:
        click.echo(f"CA certificate for clients: {settings.ca_certificate}", err=True)
    serve_foreground(settings)


@click.group("env")
def env_group() -> None:
    """Build environment images (EnvironmentLocks)."""


@env_group.command("build")
@click.argument("env_definition", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--base",
    required=True,
    envvar="ANIMUS_RUNNER_IMAGE",
    help="Runner image, REGISTRY/REPO@sha256:….",
)
@click.option(
    "--wheelhouse",
    required=True,
    envvar="ANIMUS_WHEELHOUSE",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)
@click.option(
    "--repository", required=True, help="Where to push the environment image, REGISTRY/REPO."
)
@click.option("--json", "as_json", is_flag=True, help="Print the EnvironmentLock as JSON.")
@_registry_options
@reports_errors
def env_build_command(
    env_definition: Path,
    base: str,
    wheelhouse: Path,
    repository: str,
    as_json: bool,
    ca_file: str | None,
    username: str | None,
    password: str | None,
) -> None:
    """Layer ENV_DEFINITION's packages from the offline wheelhouse onto the runner image,
    push it, and print the EnvironmentLock data."""
    target = parse_reference(repository)
    lock = build_environment(
        load_environment_definition(env_definition),
        base=base,
        wheelhouse=wheelhouse,
        client=_client(target.registry, ca_file, username, password),
        repository=target.repository,
        progress=StreamProgress(),
    )
    if as_json:
        click.echo(json.dumps(lock, indent=2))
    else:
        click.echo(lock["image_reference"])
        for package in lock["packages"]:
            click.echo(f"  {package['name']}=={package['version']} sha256:{package['sha256']}")


if __name__ == "__main__":
    # `python -m appliance.images.cli …` works before the top-level `animus` group adds these.
    click.Group("animus", commands=[image_group, registry_group, env_group])()
