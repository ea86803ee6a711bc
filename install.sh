#!/usr/bin/env bash
# Animus Datalab installer.
#
#   ./install.sh --bundle animus-V.tar [--trust-fingerprint FPR] [--prefix /opt/animus]
#                [--single-host | --kubernetes --kubeconfig PATH] [--port 8080]
#                [--registry-port 5000] [--settings site.yml] [--allow-downgrade]
#       Install or upgrade from a bundle file. The host's own gpg checks the detached
#       signature (animus-V.tar.sig) first; the bundled verifier then unpacks the tar
#       safely into PREFIX/releases/V and checks every file against the signed manifest;
#       a virtualenv is made from the bundle's offline wheels (pip --no-index
#       --require-hashes) and Ansible deploys: registry, database, control plane, Data
#       Plane, smoke test. An upgrade backs up and migrates first and keeps the previous
#       release for `animus rollback`. Run without --bundle from an unpacked bundle to
#       install that directory. --settings passes a YAML file of Ansible variables
#       (docs/ansible.md: PostgreSQL URL, registry name and password, …).
#
#   ./install.sh --verify-only [--bundle animus-V.tar] [--trust-fingerprint FPR] [--prefix DIR]
#                [--allow-downgrade]
#       Verify a bundle and stop: exit 0 only for a good bundle (codes: docs/bundle.md).
#       Without --bundle, the unpacked bundle this install.sh is in. The version installed
#       in PREFIX is the floor (a downgrade is refused); a .tar is unpacked into $TMPDIR
#       and removed.
#
#   ./install.sh --demo [--serve] [--port PORT]
#       On a source checkout: set up .venv, start the appliance on the embedded default
#       (SQLite, blob store and local registry under ./.animus-demo) and walk the full ML
#       cycle: dataset version, code at a commit, environment built from the offline
#       wheelhouse, a production Run in a runc container, its replay, the audit check.
#
# Exit status: 0 done; 2 usage; 3 a host prerequisite is missing; 5 the installation
# refused (e.g. the version is installed from another bundle); 6 the deployment failed;
# 10-42 the bundle was refused (docs/bundle.md). Guide: docs/install.md.
set -euo pipefail
caller_dir="$PWD"
cd "$(dirname "$0")"
here="$PWD"
started=$SECONDS

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
say() { echo "install.sh: [$((SECONDS - started))s] $*" >&2; }
die() { local status="$1"; shift; echo "install.sh: $*" >&2; exit "$status"; }

mode=""
demo_args=()
verify_args=()
bundle=""
trusted=""
prefix="/opt/animus"
target="single-host"
kubeconfig=""
settings=""
port="8080"
registry_port="5000"
# An option's value: present and not the next option, else a usage error (exit 2).
value_of() { if [ -z "${2:-}" ] || [[ "$2" == --* ]]; then die 2 "$1 needs $3"; fi; }
while [ $# -gt 0 ]; do
  case "$1" in
    --demo) mode="demo" ;;
    --serve) demo_args+=("--serve") ;;
    --port) value_of "$1" "${2:-}" "a port number"; port="$2"; demo_args+=("--port" "$port"); shift ;;
    --registry-port) value_of "$1" "${2:-}" "a port number"; registry_port="$2"; shift ;;
    --verify-only) mode="verify" ;;
    --bundle) value_of "$1" "${2:-}" "the bundle file"; bundle="$2"; shift ;;
    --prefix) value_of "$1" "${2:-}" "a directory"; prefix="$2"; shift ;;
    --single-host) target="single-host" ;;
    --kubernetes) target="kubernetes" ;;
    --kubeconfig) value_of "$1" "${2:-}" "a file"; kubeconfig="$2"; shift ;;
    --settings) value_of "$1" "${2:-}" "a YAML file"; settings="$2"; shift ;;
    --trust-fingerprint)
      value_of "$1" "${2:-}" "a fingerprint"
      trusted="${2// /}"
      [[ "$trusted" =~ ^([0-9A-Fa-f]{40}|[0-9A-Fa-f]{64})$ ]] \
        || die 2 "--trust-fingerprint needs a full key fingerprint (40 or 64 hex digits), not $2"
      verify_args+=("--trust-fingerprint" "$trusted"); shift ;;
    --allow-downgrade) verify_args+=("--allow-downgrade") ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
for option in port registry_port; do
  if ! [[ "${!option}" =~ ^[0-9]{1,5}$ ]] || [ "${!option}" -lt 1 ] || [ "${!option}" -gt 65535 ]; then
    die 2 "--${option//_/-} needs a port number (1-65535), not ${!option}"
  fi
done
absolute() { case "$1" in ""|/*) echo "$1" ;; *) echo "$caller_dir/$1" ;; esac; }
bundle="$(absolute "$bundle")"
prefix="$(absolute "$prefix")"
kubeconfig="$(absolute "$kubeconfig")"
settings="$(absolute "$settings")"

# The first check uses nothing from the bundle: only the host's gpg and the trust anchor.
# The file is opened once (fd 3) and read through that descriptor here and when its verifier
# is taken out: a file renamed over the bundle's path meanwhile is not the one read.
outer_signature_check() {
  local file="$1" status fingerprints
  [ -f "$file" ] || die 2 "no bundle file $file"
  [ -f "$file.sig" ] || die 10 "signature missing: $file.sig not found"
  command -v gpg >/dev/null || die 3 "gpg is required to verify the bundle"
  exec 3<"$file"
  status="$(gpg --batch --status-fd 1 --verify "$file.sig" /dev/fd/3 2>/dev/null || true)"
  has() { grep -q "^\[GNUPG:\] $1 " <<<"$status"; }
  has BADSIG && die 11 "BAD signature over $file: do not use this bundle"
  has NO_PUBKEY && die 12 "signature by an unknown key: import the release public key first"
  # gpg reports VALIDSIG for a revoked or expired key too: GOODSIG is the word for "good".
  has REVKEYSIG && die 13 "signed by a revoked key: do not use this bundle"
  has EXPKEYSIG && die 13 "signed by an expired key: do not use this bundle"
  has EXPSIG && die 11 "the signature over $file has expired"
  { has GOODSIG && has VALIDSIG; } || die 11 "no good signature over $file: do not use this bundle"
  # VALIDSIG fields: 3 = signing key, 12 = primary key fingerprint.
  fingerprints="$(awk '$2 == "VALIDSIG" {print $3; print $12}' <<<"$status")"
  if [ -n "$trusted" ]; then
    grep -Fqix "$trusted" <<<"$fingerprints" \
      || die 13 "signed by a key that is not $trusted: untrusted"
  elif ! grep -qE '^\[GNUPG:\] TRUST_(FULLY|ULTIMATE)' <<<"$status"; then
    die 13 "the signing key is not trusted in this keyring (or give --trust-fingerprint)"
  fi
  echo "install.sh: outer signature good ($(head -n1 <<<"$fingerprints"))" >&2
}

python="${PYTHON:-python3}"
require_python() {
  command -v "$python" >/dev/null || die 3 "python3 (3.11) is required"
  "$python" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' \
    || die 3 "Python 3.11 or newer is required, found $("$python" -V 2>&1)"
}

# --verify-only: the bundle file (outer signature, then unpacked into a scratch directory that
# is removed afterwards), or this unpacked bundle itself; checked against what PREFIX holds.
verify_only() {
  local verifier="$here/verify.py" scratch status=0
  [ -f "$here/bundle/verify.py" ] && verifier="$here/bundle/verify.py"  # a source checkout
  require_python
  verify_args+=("--install-dir" "$prefix")
  if [ -z "$bundle" ]; then
    [ -f "$here/MANIFEST.json" ] \
      || die 2 "--verify-only needs --bundle FILE (or run the install.sh of an unpacked bundle)"
    exec "$python" -I -S "$verifier" "$here" "${verify_args[@]}"
  fi
  outer_signature_check "$bundle"
  scratch="$(mktemp -d "${TMPDIR:-/tmp}/animus-verify.XXXXXX")"
  "$python" -I -S "$verifier" "$bundle" --target "$scratch/unpacked" "${verify_args[@]}" \
    || status=$?
  rm -rf "$scratch"
  exit "$status"
}
[ "$mode" = "verify" ] && verify_only

# --- install or upgrade from a bundle ---------------------------------------------------------

# What the host must have before anything is unpacked; each missing part named with its
# Debian package (install them from the local mirror: nothing is fetched from here on).
check_host() {
  local missing=() tool
  require_python
  "$python" -c 'import venv, ensurepip' 2>/dev/null \
    || die 3 "Python's venv module with ensurepip is required (Debian: python3-venv)"
  "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || die 3 "the bundle's wheels are for CPython 3.11, found $("$python" -V 2>&1) (set PYTHON=)"
  for tool in gpg tar; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  if [ "$target" = "single-host" ]; then
    for tool in runc docker-registry git; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    [ "$(id -u)" = 0 ] || die 3 "a single-host installation runs runc containers and must run as root"
  else
    [ -n "$kubeconfig" ] || die 2 "--kubernetes needs --kubeconfig PATH"
    [ -r "$kubeconfig" ] || die 3 "cannot read the kubeconfig $kubeconfig"
  fi
  [ ${#missing[@]} -eq 0 ] || die 3 "missing on this host: ${missing[*]} (install the Debian packages of these names from the local mirror)"
}

# Verify into a staging directory beside the releases, then move it into place in one rename.
stage_release() {
  local staging="$1" result="$2" verifier
  if [ -n "$bundle" ]; then
    outer_signature_check "$bundle"
    version="$(basename "$bundle")"; version="${version#animus-}"; version="${version%.tar}"
    [[ "$version" =~ ^[0-9A-Za-z][0-9A-Za-z.+-]*$ ]] || die 2 "the bundle file is not named animus-VERSION.tar"
    verifier="$work/verify.py"
    # The outer signature covers the whole file, so its verifier is the one the key signed.
    tar -xOf /dev/fd/3 "animus-$version/verify.py" > "$verifier" 2>/dev/null \
      || die 20 "the bundle has no animus-$version/verify.py"
    exec 3<&-
    # From here the verifier itself checks the outer signature of what it unpacks.
    say "verifying and unpacking $bundle"
    "$python" -I -S "$verifier" "$bundle" --target "$staging" --install-dir "$prefix" --json \
      "${verify_args[@]}" > "$result"
  else
    [ -f "$here/MANIFEST.json" ] \
      || die 2 "give --bundle animus-V.tar, or run the install.sh of an unpacked bundle"
    version="$("$python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' "$here/MANIFEST.json")"
    say "copying the unpacked bundle $here, then verifying the copy"
    mkdir -p "$staging"
    cp -a "$here/." "$staging/"
    "$python" -I -S "$staging/verify.py" "$staging" --install-dir "$prefix" --json \
      "${verify_args[@]}" > "$result"
  fi
}

make_venv() {
  local release="$1" venv="$1/venv"
  [ -f "$venv/.complete" ] && { say "virtualenv of $version already made"; return; }
  rm -rf "$venv"
  say "creating the virtualenv from the bundle's offline wheels (no network)"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-compile \
    --find-links "$release/offline-wheels" --require-hashes -r "$release/requirements.lock" \
    || { rm -rf "$venv"; die 6 "installing the offline wheels failed"; }
  # The appliance's own wheel: its hash is in the signed manifest, checked above.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-compile --no-deps \
    "$release"/offline-wheels/animus_datalab-*.whl \
    || { rm -rf "$venv"; die 6 "installing the appliance's wheel failed"; }
  touch "$venv/.complete"
}

# PREFIX/bin/animus: the current release's command with the installation's settings.
write_command() {
  mkdir -p "$prefix/bin" "$prefix/etc"
  cat > "$prefix/bin/.animus.new" <<EOF
#!/bin/sh
# The current release's animus, with the settings of this installation.
set -a
[ -r "$prefix/etc/animus.env" ] && . "$prefix/etc/animus.env"
set +a
ANIMUS_PREFIX="$prefix" exec "$prefix/current/venv/bin/animus" "\$@"
EOF
  chmod 0755 "$prefix/bin/.animus.new"
  mv -f "$prefix/bin/.animus.new" "$prefix/bin/animus"
}

if [ "$mode" = "" ]; then
  check_host
  mkdir -p "$prefix/releases" "$prefix/state"
  work="$(mktemp -d)"
  staging="$prefix/releases/.staging-$$"
  trap 'rm -rf "$work" "$staging"' EXIT
  status=0
  stage_release "$staging" "$work/verification.json" || status=$?
  [ "$status" = 0 ] || die "$status" "the bundle was refused (exit $status; see docs/bundle.md); nothing was installed"
  release="$prefix/releases/$version"
  if [ -d "$release" ]; then
    cmp -s "$release/MANIFEST.json" "$staging/MANIFEST.json" \
      || die 5 "release $version is already installed from a different bundle ($release)"
    rm -rf "$staging"
    say "release $version is already unpacked and verified; continuing"
  else
    mv "$staging" "$release"
  fi
  cp "$work/verification.json" "$prefix/state/verification-$version.json"
  say "bundle $version verified: $(cat "$work/verification.json")"
  make_venv "$release"
  write_command
  inventory="$release/ansible/inventories/$target/hosts.yml"
  [ -f "$inventory" ] || die 6 "the bundle has no Ansible inventory $inventory"
  extra=(-e "animus_prefix=$prefix" -e "animus_release_dir=$release" -e "animus_version=$version"
         -e "animus_verification_file=$prefix/state/verification-$version.json"
         -e "animus_port=$port" -e "animus_registry_port=$registry_port")
  [ -z "$kubeconfig" ] || extra+=(-e "animus_k8s_kubeconfig=$kubeconfig")
  [ -z "$settings" ] || extra+=(-e "@$settings")
  say "handing over to Ansible ($target)"
  (cd "$release/ansible" && "$release/venv/bin/ansible-playbook" -i "$inventory" site.yml "${extra[@]}") \
    || die 6 "the deployment failed; the previous release (if any) is still installed: see docs/install.md"
  say "Animus Datalab $version is installed in $prefix"
  if [ "$target" = "single-host" ]; then
    say "control plane: http://127.0.0.1:$port  (readiness: /readyz)"
    say "first administrator: $prefix/bin/animus admin create-user NAME --system-admin --password-stdin"
  fi
  exit 0
fi

[ "$mode" = "demo" ] || { usage >&2; exit 2; }

require_python
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
