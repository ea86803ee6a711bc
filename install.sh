#!/usr/bin/env bash
# Animus Datalab installer.
#
#   ./install.sh --demo [--serve] [--port PORT]
#       On a source checkout: set up .venv, start the appliance on the embedded default
#       (SQLite, blob store and local registry under ./.animus-demo) and walk the full ML
#       cycle: dataset version, code at a commit, environment built from the offline
#       wheelhouse, a production Run in a runc container, its replay, the audit check.
#
# The installer only checks the host and hands over to Python; see docs/install.md.
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

mode=""
demo_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --demo) mode="demo" ;;
    --serve) demo_args+=("--serve") ;;
    --port) demo_args+=("--port" "${2:?--port needs a number}"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
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
