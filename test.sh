#!/usr/bin/env bash
# Runs the whole test suite: lint, then unit and integration tests on SQLite and PostgreSQL.
# On a fresh machine it first creates .venv and installs the pinned Python dependencies.
# System packages (PostgreSQL, runc, registry, ...) come from .ci/run or docs/development.md.
# Extra arguments go to pytest, e.g. ./test.sh -k audit -x
set -euo pipefail
cd "$(dirname "$0")"

venv="${ANIMUS_VENV:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "test.sh: creating $venv" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.animus-installed"
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  echo "test.sh: installing the pinned dependencies into $venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test,release,deploy]'
  echo "$wanted" > "$stamp"
fi

"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check --quiet appliance tests
exec "$venv/bin/python" -m pytest "$@"
