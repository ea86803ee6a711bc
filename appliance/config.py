"""Settings: environment variables with documented defaults, validated once at start-up.

Every setting is listed in ``SETTINGS`` with its variable, default and meaning; `docs/configuration.md`
is generated from the same table (``animus config docs``), so the two cannot drift.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class Setting:
    env: str
    default: str
    help: str


SETTINGS: dict[str, Setting] = {
    "data_dir": Setting(
        "ANIMUS_DATA_DIR", ".animus", "Directory for the embedded database and the blob store."
    ),
    "database_url": Setting(
        "ANIMUS_DATABASE_URL",
        "",
        "Database URL. Empty: SQLite at <data_dir>/animus.db. "
        "`postgresql://user:pass@host:port/db` for PostgreSQL.",
    ),
    "max_json_bytes": Setting(
        "ANIMUS_MAX_JSON_BYTES", str(1 << 20), "Largest JSON request body accepted, in bytes."
    ),
    "max_upload_bytes": Setting(
        "ANIMUS_MAX_UPLOAD_BYTES",
        str(64 << 30),
        "Largest dataset upload (sum of file sizes), in bytes.",
    ),
    "max_upload_files": Setting(
        "ANIMUS_MAX_UPLOAD_FILES", "100000", "Most files one dataset version may hold."
    ),
    "token_ttl_seconds": Setting(
        "ANIMUS_TOKEN_TTL_SECONDS",
        str(30 * 24 * 3600),
        "Default lifetime of an API token, in seconds.",
    ),
    "max_token_ttl_seconds": Setting(
        "ANIMUS_MAX_TOKEN_TTL_SECONDS",
        str(366 * 24 * 3600),
        "Longest lifetime an API token may be given, in seconds.",
    ),
    "blob_fsync": Setting(
        "ANIMUS_BLOB_FSYNC",
        "1",
        "1: flush every stored blob to disk before it is recorded (durable). 0: skip (tests only).",
    ),
    "log_level": Setting("ANIMUS_LOG_LEVEL", "INFO", "Log level of the JSON logs on stderr."),
    "secrets_dir": Setting(
        "ANIMUS_SECRETS_DIR",
        "/etc/animus/secrets",
        "The file secret provider's directory: `<project_id>/<NAME>` files, mode 0600. "
        "Kept outside the data dir: secret values are never stored with our data.",
    ),
    "registry_url": Setting(
        "ANIMUS_REGISTRY_URL",
        "",
        "The local OCI registry (e.g. `http://127.0.0.1:5000`) that holds every environment "
        "image; production Runs verify their EnvironmentLock's digest there.",
    ),
    "environment_repository": Setting(
        "ANIMUS_ENVIRONMENT_REPOSITORY",
        "animus/environments",
        "Registry repository of environment images (EnvironmentLocks pin digests in it).",
    ),
    "lease_seconds": Setting(
        "ANIMUS_LEASE_SECONDS",
        "30",
        "How long a Data Plane's lease on a Run lasts without a heartbeat; then the Run "
        "becomes `unknown` until the Data Plane reports again.",
    ),
    "signing_gnupg_home": Setting(
        "ANIMUS_SIGNING_GNUPG_HOME",
        "",
        "GPG home holding the key that signs model export packages. Empty: "
        "`<data_dir>/gnupg`, where an ed25519 installation key without passphrase is "
        "generated on first use. Production should provide its own home and key.",
    ),
    "signing_key": Setting(
        "ANIMUS_SIGNING_KEY",
        "",
        "Fingerprint of the secret key in the signing GPG home that signs exports. Empty: the "
        "generated installation key.",
    ),
    "session_ttl_seconds": Setting(
        "ANIMUS_SESSION_TTL_SECONDS",
        str(12 * 3600),
        "Longest life of a web UI session, in seconds, however active it is.",
    ),
    "session_idle_seconds": Setting(
        "ANIMUS_SESSION_IDLE_SECONDS",
        str(30 * 60),
        "A web UI session ends after this many seconds without a request.",
    ),
    "max_sessions_per_user": Setting(
        "ANIMUS_MAX_SESSIONS_PER_USER",
        "5",
        "Most parallel web UI sessions of one user; signing in once more ends the oldest.",
    ),
    "session_cookie_secure": Setting(
        "ANIMUS_SESSION_COOKIE_SECURE",
        "auto",
        "Mark the session cookie `Secure`: `auto` when the request came over HTTPS, `1` "
        "always (behind a TLS-terminating proxy), `0` never.",
    ),
}


class ConfigError(ValueError):
    """A setting has a value the appliance cannot run with."""


@dataclass(frozen=True)
class Config:
    data_dir: Path
    database_url: str
    max_json_bytes: int
    max_upload_bytes: int
    max_upload_files: int
    token_ttl_seconds: int
    max_token_ttl_seconds: int
    blob_fsync: bool
    log_level: str
    secrets_dir: Path
    registry_url: str
    environment_repository: str
    lease_seconds: int
    signing_gnupg_home: str
    signing_key: str
    session_ttl_seconds: int
    session_idle_seconds: int
    max_sessions_per_user: int
    session_cookie_secure: str

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def gnupg_home(self) -> Path:
        """The signing GPG home: the configured one, or ``<data_dir>/gnupg``."""
        if self.signing_gnupg_home:
            return Path(self.signing_gnupg_home).absolute()
        return self.data_dir / "gnupg"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'animus.db'}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Config:
        """Read every setting from ``environ`` (default: the process environment).

        ``overrides`` win over the environment; tests use them to get a private data dir.
        """
        environ = os.environ if environ is None else environ
        raw = {name: environ.get(s.env, s.default) for name, s in SETTINGS.items()}
        raw.update({k: v for k, v in overrides.items() if v is not None})
        values: dict[str, object] = {}
        for f in fields(cls):
            value = raw[f.name]
            setting = SETTINGS[f.name]
            try:
                if f.type == "Path":
                    values[f.name] = Path(value).absolute()
                elif f.type == "int":
                    values[f.name] = int(value)
                    if values[f.name] <= 0:
                        raise ValueError("must be positive")
                elif f.type == "bool":
                    values[f.name] = _parse_bool(value)
                else:
                    values[f.name] = str(value)
            except ValueError as exc:
                raise ConfigError(f"{setting.env}={value!r}: {exc}") from None
        if values["session_cookie_secure"] not in ("auto", "1", "0"):
            raise ConfigError("ANIMUS_SESSION_COOKIE_SECURE must be auto, 1 or 0")
        url = str(values["database_url"])
        if url and not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ConfigError("ANIMUS_DATABASE_URL must start with sqlite:/// or postgresql://")
        return cls(**values)  # type: ignore[arg-type]


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def settings_markdown() -> str:
    """The configuration reference as a Markdown table."""
    lines = [
        "# Configuration",
        "",
        "Every setting is an environment variable. Generated by `animus config docs`.",
        "",
        "| variable | default | meaning |",
        "| --- | --- | --- |",
    ]
    for s in SETTINGS.values():
        lines.append(f"| `{s.env}` | `{s.default or '(empty)'}` | {s.help} |")
    return "\n".join(lines) + "\n"
