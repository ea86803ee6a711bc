"""The installation's signing key: a GPG key that signs export manifests, driven via ``gpg``.

By default the key lives in a GPG home under the data dir and is generated on first use
(ed25519, no passphrase, so the appliance can sign unattended). Production installations
should provide their own key instead: a GPG home and the fingerprint of a secret key in it
(``ANIMUS_SIGNING_GNUPG_HOME``, ``ANIMUS_SIGNING_KEY``).

Everything here shells out to the ``gpg`` binary: the same program an auditor uses offline
to check the signatures.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import AnimusError

#: The user id of a generated installation key: ``Animus Datalab installation <id>``.
GENERATED_UID_PREFIX = "Animus Datalab installation "
# gpg-agent's sockets live in the GPG home; a Unix socket path has at most 107 bytes.
_LONGEST_SOCKET_NAME = len("/S.gpg-agent.browser")
_SOCKET_PATH_LIMIT = 100
_short_homes: dict[Path, Path] = {}
log = logging.getLogger("appliance.signing")


class SigningUnavailable(AnimusError):
    code = "signing_unavailable"


@dataclass(frozen=True)
class SigningKey:
    fingerprint: str
    public_key: str  # ASCII-armored
    algorithm: str
    generated: bool  # whether this call generated it


def _gpg_home(home: Path) -> Path:
    """``home``, or a short symlink to it when gpg-agent's socket path would be too long."""
    if len(str(home)) + _LONGEST_SOCKET_NAME <= _SOCKET_PATH_LIMIT:
        return home
    short = _short_homes.get(home)
    if short is None or not short.is_symlink():
        # A fresh private directory (mode 0700, unpredictable name) holds the link, so no
        # other local user can plant a link of their own in its place.
        short = Path(tempfile.mkdtemp(prefix="animus-gpg-")) / "h"
        short.symlink_to(home)
        _short_homes[home] = short
    return short


def _gpg(home: Path, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    if shutil.which("gpg") is None:
        raise SigningUnavailable("gpg is not installed on this server")
    try:
        return subprocess.run(
            ["gpg", "--batch", "--no-tty", "--homedir", str(_gpg_home(home)), *args],
            input=input,
            capture_output=True,
            check=True,
            timeout=60,
        )
    except subprocess.CalledProcessError as exc:
        # gpg's own words may name server paths: they go to the log, not to the client.
        log.error("gpg %s failed: %s", args[0], exc.stderr.decode(errors="replace")[-2000:])
        raise SigningUnavailable(
            f"gpg failed ({args[0]}, exit {exc.returncode}); see the server log"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise SigningUnavailable("gpg did not answer in time") from exc


def _secret_keys(home: Path) -> list[tuple[str, str]]:
    """``(fingerprint, first user id)`` of every secret key in ``home``."""
    listing = _gpg(home, "--with-colons", "--list-secret-keys").stdout.decode()
    keys: list[tuple[str, str]] = []
    primary, fingerprint = False, None
    for line in listing.splitlines():
        fields = line.split(":")
        if fields[0] == "sec":
            primary, fingerprint = True, None
        elif fields[0] == "ssb":
            primary = False
        elif fields[0] == "fpr" and primary and fingerprint is None:
            fingerprint = fields[9]
        elif fields[0] == "uid" and primary and fingerprint is not None:
            keys.append((fingerprint, fields[9]))
            primary = False
    return keys


@contextlib.contextmanager
def _locked(home: Path):
    """Serialize key generation between the server's processes."""
    with open(home / ".animus-keygen.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prepare_home(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)


def signing_key(home: Path, configured: str, installation_id: str) -> SigningKey:
    """The key that signs exports: ``configured`` (a fingerprint), or the generated one.

    Generates the installation key in ``home`` the first time it is needed.
    """
    _prepare_home(home)
    generated = False
    if configured:
        wanted = configured.replace(" ", "").upper()
        fingerprint = next((f for f, _ in _secret_keys(home) if f == wanted), None)
        if fingerprint is None:
            raise SigningUnavailable(
                "the configured signing key has no secret key in the signing GPG home"
            )
    else:
        uid = GENERATED_UID_PREFIX + installation_id
        with _locked(home):
            fingerprint = next((f for f, u in _secret_keys(home) if u == uid), None)
            if fingerprint is None:
                _gpg(
                    home,
                    "--passphrase",
                    "",
                    "--pinentry-mode",
                    "loopback",
                    "--quick-generate-key",
                    uid,
                    "ed25519",
                    "sign",
                    "never",
                )
                fingerprint = next(f for f, u in _secret_keys(home) if u == uid)
                generated = True
    public = _gpg(home, "--armor", "--export-options", "export-minimal", "--export", fingerprint)
    return SigningKey(
        fingerprint=fingerprint,
        public_key=public.stdout.decode("ascii"),
        algorithm=_algorithm(home, fingerprint),
        generated=generated,
    )


def existing_signing_key(home: Path, configured: str, installation_id: str) -> SigningKey | None:
    """The key ``signing_key`` would use, or None when the installation key is not made yet.

    Never generates a key (for pages that only show it).
    """
    if configured:
        return signing_key(home, configured, installation_id)
    if not home.is_dir():
        return None
    uid = GENERATED_UID_PREFIX + installation_id
    if not any(u == uid for _, u in _secret_keys(home)):
        return None
    return signing_key(home, configured, installation_id)


def _algorithm(home: Path, fingerprint: str) -> str:
    listing = _gpg(home, "--with-colons", "--list-keys", fingerprint).stdout.decode()
    for line in listing.splitlines():
        fields = line.split(":")
        if fields[0] == "pub":
            return fields[16] or {"1": "rsa", "17": "dsa", "22": "eddsa"}.get(fields[3], fields[3])
    return "unknown"


def detach_sign(home: Path, fingerprint: str, data: bytes) -> bytes:
    """An ASCII-armored detached signature over ``data`` by the key ``fingerprint``."""
    result = _gpg(
        home,
        "--pinentry-mode",
        "loopback",
        "--passphrase",
        "",
        "--local-user",
        fingerprint + "!",
        "--digest-algo",
        "SHA256",
        "--armor",
        "--detach-sign",
        "--output",
        "-",
        "-",
        input=data,
    )
    return result.stdout


def stop_agent(home: Path) -> None:
    """Stop the gpg-agent serving ``home`` and remove its short link (tests, shutdown)."""
    if shutil.which("gpgconf") is None:
        return
    subprocess.run(
        ["gpgconf", "--homedir", str(_gpg_home(home)), "--kill", "gpg-agent"],
        capture_output=True,
        check=False,
        timeout=30,
    )
    short = _short_homes.pop(home, None)
    if short is not None:
        with contextlib.suppress(OSError):
            short.unlink()
            short.parent.rmdir()
