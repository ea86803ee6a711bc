"""``animus bundle build | verify | lock``.

The top-level ``animus`` group loads ``bundle_group`` when it runs. Progress
goes to stderr, results to stdout. The build's dependencies (python-gnupg, CycloneDX) are
imported only when a bundle is built.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import click

from appliance.errors import AnimusError
from appliance.images.progress import StreamProgress

REPO_ROOT = Path(__file__).resolve().parents[2]
VERIFIER = REPO_ROOT / "bundle" / "verify.py"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``650M``, ``4G``, ``1048576`` → bytes (binary units)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    try:
        number = int(value[: len(value) - len(unit)])
    except ValueError:
        raise click.BadParameter(f"not a size: {text!r} (use e.g. 650M or 4G)") from None
    if number <= 0:
        raise click.BadParameter("the size must be positive")
    return number * _UNITS[unit]


@functools.cache
def _verifier() -> ModuleType:
    """``bundle/verify.py`` as a module: a script that ships beside its bundle, not a package
    module, so it is loaded from its file. Its rules are the ones a bundle must pass."""
    if not VERIFIER.is_file():
        raise click.ClickException(f"the verifier {VERIFIER} is not in this installation")
    spec = importlib.util.spec_from_file_location("animus_bundle_verify", VERIFIER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _release_version(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """A version the verifier accepts (``1.2.0``, ``1.2.0rc1``), checked before anything is
    built: it names the bundle's folder and files, and a bundle its own verifier refuses is
    no use."""
    if value is None:
        return None
    try:
        _verifier().parse_version(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value.strip()


def _io_failure(exc: OSError) -> click.ClickException:
    where = f": {exc.filename}" if exc.filename else ""
    return click.ClickException(f"io_error: {exc.strerror or exc}{where}")


@click.group("bundle")
def bundle_group() -> None:
    """Build and verify signed offline bundles."""


@bundle_group.command("build")
@click.option(
    "--version",
    "version",
    required=True,
    callback=_release_version,
    help="Product version of the bundle (e.g. 1.2.0 or 1.2.0rc1).",
)
@click.option("--sign-key", required=True, help="Fingerprint of the release signing key.")
@click.option(
    "--output", required=True, type=click.Path(file_okay=False), help="Where to write it."
)
@click.option("--images", help="Comma-separated images to include (default: all four).")
@click.option("--no-images", is_flag=True, help="Include no images (quick test bundles).")
@click.option("--no-wheels", is_flag=True, help="Leave out offline-wheels/ (test bundles).")
@click.option(
    "--wheelhouse",
    type=click.Path(exists=True, file_okay=False),
    help="Take locked wheels from this folder instead of the package index.",
)
@click.option("--split-size", help="Cut the .tar into parts of at most this size (e.g. 4G).")
@click.option("--valid-days", type=int, help="Days until the bundle expires (bundle.toml).")
@click.option(
    "--min-upgrade-from",
    callback=_release_version,
    help="Oldest installed version it may upgrade (bundle.toml).",
)
@click.option("--gnupghome", type=click.Path(file_okay=False), envvar="GNUPGHOME")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def build_command(
    version, sign_key, output, images, no_images, no_wheels, wheelhouse, split_size,
    valid_days, min_upgrade_from, gnupghome, as_json,
) -> None:  # fmt: skip
    """Build animus-VERSION.tar and its detached signature animus-VERSION.tar.sig."""
    from appliance.bundle.build import build_bundle

    if images and no_images:
        raise click.UsageError("--images and --no-images exclude each other")
    chosen = () if no_images else (tuple(i.strip() for i in images.split(",")) if images else None)
    try:
        built = build_bundle(
            version,
            sign_key,
            output,
            images=chosen,
            wheels=not no_wheels,
            wheelhouse=Path(wheelhouse) if wheelhouse else None,
            split_size=parse_size(split_size) if split_size else None,
            valid_days=valid_days,
            min_upgrade_from=min_upgrade_from,
            gnupghome=gnupghome,
            progress=StreamProgress(),
        )
    except AnimusError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from exc
    except OSError as exc:  # an output folder that cannot be made or written, a full disk
        raise _io_failure(exc) from None
    result = {
        "version": built.version,
        "tar": str(built.tar) if built.tar else None,
        "signature": str(built.signature),
        "parts": [str(p) for p in built.parts],
        "manifest_sha256": built.manifest_sha256,
        "signer_fingerprint": built.signer_fingerprint,
        "images": built.images,
        "size": built.size,
    }
    if as_json:
        click.echo(json.dumps(result, indent=1, sort_keys=True))
        return
    for path in [built.tar, *built.parts, built.signature]:
        if path is not None:
            click.echo(str(path))
    click.echo(f"manifest sha256: {built.manifest_sha256}")
    click.echo(f"signed by: {built.signer_fingerprint}")


@bundle_group.command(
    "verify",
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def verify_command(args: tuple[str, ...]) -> None:
    """Run bundle/verify.py (the verifier every bundle ships) with ARGS; its exit status
    and output pass through. ``animus bundle verify --help`` lists its options."""
    if not VERIFIER.is_file():
        raise click.ClickException(f"the verifier {VERIFIER} is not in this installation")
    sys.exit(
        subprocess.run([sys.executable, "-I", "-S", str(VERIFIER), *args], check=False).returncode
    )


@bundle_group.command("lock")
def lock_command() -> None:
    """Regenerate bundle/requirements.lock from pyproject.toml (needs the package index)."""
    from appliance.bundle.requirements import lock_requirements

    try:
        text = lock_requirements(REPO_ROOT)
    except AnimusError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from exc
    (REPO_ROOT / "bundle" / "requirements.lock").write_text(text)
    click.echo(f"wrote {REPO_ROOT / 'bundle' / 'requirements.lock'}", err=True)
