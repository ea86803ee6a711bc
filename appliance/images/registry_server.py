"""The local OCI registry: Debian's ``docker-registry`` (the CNCF distribution registry 2.8).

One host: plain HTTP on loopback. A cluster: TLS with a certificate from a CA generated here
(nodes are told to trust that CA) and htpasswd (bcrypt) authentication. Everything the
registry needs lives in one state directory: ``config.yml``, ``storage/``, ``tls/``,
``htpasswd``.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import requests

from appliance.errors import AnimusError

REGISTRY_BINARY = "docker-registry"
STORAGE_DIR = "storage"


@dataclass(frozen=True)
class RegistrySettings:
    """How to run the registry. ``listen`` is ``host:port``."""

    state_dir: Path
    listen: str = "127.0.0.1:5000"
    tls: bool = False
    hostnames: tuple[str, ...] = ("localhost",)
    users: dict[str, str] = field(default_factory=dict)  # name -> password

    @property
    def storage(self) -> Path:
        """Where blobs and manifests are kept."""
        return self.state_dir / STORAGE_DIR

    @property
    def ca_certificate(self) -> Path:
        """The CA certificate clients and nodes must trust (TLS only)."""
        return self.state_dir / "tls" / "ca.crt"


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AnimusError(
            "openssl failed while making the registry certificate", code="internal_error"
        )


def generate_tls(tls_dir: Path, hostnames: tuple[str, ...]) -> None:
    """Create a CA and a server certificate for HOSTNAMES (names or IP addresses), once.

    The CA key stays in TLS_DIR (mode 0600); re-running keeps existing files so that nodes
    that already trust the CA keep trusting the registry.
    """
    tls_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    ca_key, ca_crt = tls_dir / "ca.key", tls_dir / "ca.crt"
    key, csr, crt = tls_dir / "server.key", tls_dir / "server.csr", tls_dir / "server.crt"
    if not ca_crt.exists():
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(ca_key),
            "-out",
            str(ca_crt),
            "-days",
            "3650",
            "-subj",
            "/CN=Animus Datalab registry CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )
    if not crt.exists():
        names = []
        for host in hostnames:
            try:
                ipaddress.ip_address(host)
                names.append(f"IP:{host}")
            except ValueError:
                names.append(f"DNS:{host}")
        extensions = tls_dir / "server.ext"
        extensions.write_text(
            f"subjectAltName={','.join(names)}\nextendedKeyUsage=serverAuth\n"
            "basicConstraints=critical,CA:FALSE\n"
        )
        _openssl(
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(csr),
            "-subj",
            f"/CN={hostnames[0]}",
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca_crt),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-out",
            str(crt),
            "-days",
            "825",
            "-extfile",
            str(extensions),
        )
    for secret in (ca_key, key):
        os.chmod(secret, 0o600)


def write_htpasswd(path: Path, users: dict[str, str]) -> None:
    """Write an htpasswd file with bcrypt hashes (the only kind the registry accepts)."""
    lines = [
        f"{name}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()}\n"
        for name, password in sorted(users.items())
    ]
    path.write_text("".join(lines))
    os.chmod(path, 0o600)


def _http_secret(state_dir: Path) -> str:
    """The key the registry signs upload state with; it must survive restarts, or uploads
    interrupted by a restart could not resume."""
    path = state_dir / "http-secret"
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        os.chmod(path, 0o600)
    return path.read_text().strip()


def write_config(settings: RegistrySettings) -> Path:
    """Prepare the state directory and write the registry's ``config.yml``."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings.storage.mkdir(exist_ok=True)
    lines = [
        "version: 0.1",
        "log:",
        "  level: warn",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {settings.storage}",
        "  delete:",
        "    enabled: false",
        "  maintenance:",
        "    uploadpurging:",
        "      enabled: true",
        "      age: 168h",
        "      interval: 24h",
        "      dryrun: false",
        "http:",
        f"  addr: {settings.listen}",
        f"  secret: {_http_secret(settings.state_dir)}",
        "  headers:",
        "    X-Content-Type-Options: [nosniff]",
    ]
    if settings.tls:
        tls_dir = settings.state_dir / "tls"
        generate_tls(tls_dir, settings.hostnames)
        lines += [
            "  tls:",
            f"    certificate: {tls_dir / 'server.crt'}",
            f"    key: {tls_dir / 'server.key'}",
        ]
    if settings.users:
        htpasswd = settings.state_dir / "htpasswd"
        write_htpasswd(htpasswd, settings.users)
        lines += [
            "auth:",
            "  htpasswd:",
            "    realm: animus-registry",
            f"    path: {htpasswd}",
        ]
    config = settings.state_dir / "config.yml"
    config.write_text("\n".join(lines) + "\n")
    return config


class RunningRegistry:
    """A ``docker-registry`` process; use as a context manager or call ``stop()``."""

    def __init__(self, settings: RegistrySettings, process: subprocess.Popen):
        self.settings = settings
        self.process = process

    @property
    def address(self) -> str:
        """``host:port`` to put in image references."""
        return self.settings.listen

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until ``GET /v2/`` answers (401 counts: auth is on and the server is up)."""
        scheme = "https" if self.settings.tls else "http"
        verify: bool | str = str(self.settings.ca_certificate) if self.settings.tls else True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AnimusError("the registry exited at start", code="unavailable")
            try:
                response = requests.get(
                    f"{scheme}://{self.settings.listen}/v2/", timeout=1, verify=verify
                )
                if response.status_code in (200, 401):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise AnimusError("the registry did not become ready", code="unavailable")

    def stop(self) -> None:
        """Terminate the registry and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> RunningRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_registry(settings: RegistrySettings, *, log: Path | None = None) -> RunningRegistry:
    """Write the config, start ``docker-registry serve`` in the background and wait for it."""
    config = write_config(settings)
    output = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - owned by Popen
    process = subprocess.Popen(
        [REGISTRY_BINARY, "serve", str(config)], stdout=output, stderr=subprocess.STDOUT
    )
    running = RunningRegistry(settings, process)
    try:
        running.wait_ready()
    except BaseException:
        running.stop()
        raise
    return running


def serve_foreground(settings: RegistrySettings) -> None:
    """Become the registry (``animus registry serve``): exec, so that signals from a service
    manager or a terminal reach the registry itself and no orphan is left behind."""
    config = write_config(settings)
    os.execvp(REGISTRY_BINARY, [REGISTRY_BINARY, "serve", str(config)])  # noqa: S606 - fixed argv
