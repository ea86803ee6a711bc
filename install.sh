#!/usr/bin/env bash
# Animus Datalab installer.
#
#   ./install.sh --verify-only --bundle animus-V.tar [--trust-fingerprint FPR] [--allow-downgrade]
#       Check a bundle before anything in it runs: the host's own gpg verifies the detached
#       signature over the whole file (animus-V.tar.sig) against the trust anchor (the host
#       keyring, or the release key's fingerprint), then the stdlib-only verifier checks the
#       signed manifest and every file. Exit 0 only for a good bundle (codes: docs/bundle.md).
#
#   ./install.sh --demo [--serve] [--port PORT]
#       On a source checkout: set up .venv, start the appliance on the embedded default
#       (SQLite, blob store and local registry under ./.animus-demo) and walk the full ML
#       cycle: dataset version, code at a commit, environment built from the offline
#       wheelhouse, a production Run in a runc container, its replay, the audit check.
#
# The installer only checks the host and hands over to Python; see docs/install.md.
set -euo pipefail
caller_dir="$PWD"
cd "$(dirname "$0")"

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

mode=""
demo_args=()
verify_args=()
bundle=""
trusted=""
while [ $# -gt 0 ]; do
  case "$1" in
    --demo) mode="demo" ;;
    --serve) demo_args+=("--serve") ;;
    --port) demo_args+=("--port" "${2:?--port needs a number}"); shift ;;
    --verify-only) mode="verify" ;;
    --bundle) bundle="${2:?--bundle needs the bundle file}"; shift ;;
    --trust-fingerprint)
      trusted="${2:?--trust-fingerprint needs a fingerprint}"
      verify_args+=("--trust-fingerprint" "$trusted"); shift ;;
    --allow-downgrade) verify_args+=("--allow-downgrade") ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

# The first check uses nothing from the bundle: only the host's gpg and the trust anchor.
outer_signature_check() {
  local file="$1" status fingerprints
  [ -f "$file" ] || { echo "install.sh: no bundle file $file" >&2; exit 2; }
  [ -f "$file.sig" ] || { echo "install.sh: signature missing: $file.sig not found" >&2; exit 10; }
  command -v gpg >/dev/null || { echo "install.sh: gpg is required to verify the bundle" >&2; exit 3; }
  status="$(gpg --batch --status-fd 1 --verify "$file.sig" "$file" 2>/dev/null || true)"
  if ! grep -q '^\[GNUPG:\] VALIDSIG ' <<<"$status"; then
    if grep -q '^\[GNUPG:\] NO_PUBKEY ' <<<"$status"; then
      echo "install.sh: signature by an unknown key: import the release public key first" >&2
      exit 12
    fi
    echo "install.sh: BAD signature over $file: do not use this bundle" >&2
    exit 11
  fi
  # VALIDSIG fields: 3 = signing key, 12 = primary key fingerprint.
  fingerprints="$(awk '$2 == "VALIDSIG" {print $3; print $12}' <<<"$status")"
  if [ -n "$trusted" ]; then
    grep -qix "${trusted// /}" <<<"$fingerprints" \
      || { echo "install.sh: signed by a key that is not $trusted: untrusted" >&2; exit 13; }
  elif ! grep -qE '^\[GNUPG:\] TRUST_(FULLY|ULTIMATE)' <<<"$status"; then
    echo "install.sh: the signing key is not trusted in this keyring (or give --trust-fingerprint)" >&2
    exit 13
  fi
  echo "install.sh: outer signature good ($(head -n1 <<<"$fingerprints"))" >&2
}

case "$bundle" in ""|/*) ;; *) bundle="$caller_dir/$bundle" ;; esac
if [ "$mode" = "verify" ]; then
  [ -n "$bundle" ] || { echo "install.sh: --verify-only needs --bundle FILE" >&2; exit 2; }
  outer_signature_check "$bundle"
  exec "${PYTHON:-python3}" "$(pwd)/bundle/verify.py" "$bundle" "${verify_args[@]}"
fi
if [ -n "$bundle" ]; then
  echo "install.sh: installing from a bundle is not available in this release yet;" \
       "use --verify-only to check one, and --demo to try the appliance" >&2
  exit 2
fi
[ "$mode" = "demo" ] || { usage >&2; exit 2; }

python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "install.sh: python3 (3.11+) is required" >&2; exit 3; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "install.sh: Python 3.11 or newer is required, found $("$python" -V)" >&2; exit 3; }
# The demo runs user code in runc containers from images in a local registry.
needed=()
for tool in git runc docker-registry; do command -v "$tool" >/dev/null || needed+=("$tool"); done
if [ ${#needed[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "install.sh: installing ${needed[*]} (Debian packages)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${needed[@]}" >/dev/null
  else
    echo "install.sh: missing ${needed[*]}; install them (Debian: apt-get install ${needed[*]})" >&2
    exit 3
  fi
fi
[ "$(id -u)" = 0 ] || { echo "install.sh: the demo starts runc containers and must run as root" >&2; exit 3; }

venv="${ANIMUS_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "install.sh: creating $venv" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.animus-installed"
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  echo "install.sh: installing the appliance into $venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]'
  echo "$wanted" > "$stamp"
fi

exec "$venv/bin/animus" demo "${demo_args[@]}"
