"""Detached GPG signatures for bundles, made with python-gnupg and the host's gpg.

The signing key is named by fingerprint and must have no passphrase in the signing
environment, or be unlocked by gpg-agent (a release machine's business, not ours).
"""

from __future__ import annotations

from pathlib import Path

import gnupg

from appliance.errors import AnimusError


def _gpg(gnupghome: str | Path | None) -> gnupg.GPG:
    return gnupg.GPG(gnupghome=str(gnupghome) if gnupghome else None)


def signing_fingerprint(sign_key: str, gnupghome: str | Path | None = None) -> str:
    """The full fingerprint of SIGN_KEY, which must be a secret key in the keyring."""
    wanted = sign_key.replace(" ", "").upper()
    for key in _gpg(gnupghome).list_keys(secret=True):
        fingerprints = [key["fingerprint"], *key.get("subkey_info", {}).keys()]
        if any(fpr.upper() == wanted or fpr.upper().endswith(wanted) for fpr in fingerprints):
            return key["fingerprint"].upper()
    raise AnimusError(f"no secret key {sign_key} in the signing keyring", code="invalid_request")


def sign_detached(
    path: Path,
    output: Path,
    sign_key: str,
    *,
    armor: bool,
    gnupghome: str | Path | None = None,
) -> None:
    """Write a detached signature over PATH by SIGN_KEY to OUTPUT (ASCII-armoured or binary)."""
    with open(path, "rb") as handle:
        result = _gpg(gnupghome).sign_file(
            handle, keyid=sign_key, detach=True, binary=not armor, output=str(output)
        )
    if not result or not output.exists() or output.stat().st_size == 0:
        raise AnimusError(
            f"gpg could not sign {path.name} with {sign_key}: {result.status}",
            code="invalid_request",
        )
