"""Rules of the stdlib-only verifier that need no gpg: imports, versions, paths, the table."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
VERIFY = ROOT / "bundle" / "verify.py"


def load_verifier():
    """Import bundle/verify.py, a script that ships beside its bundle, not a package module."""
    spec = importlib.util.spec_from_file_location("animus_bundle_verify", VERIFY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


verify = load_verifier()


def test_the_verifier_imports_only_the_standard_library():
    tree = ast.parse(VERIFY.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported - {"__future__"} <= set(sys.stdlib_module_names)


@pytest.mark.parametrize(
    ("older", "newer"),
    [("1.2.0", "1.10.0"), ("1.2.0rc1", "1.2.0"), ("1.2.0a1", "1.2.0b1"), ("0.9", "1.0.0")],
)
def test_versions_order(older, newer):
    assert verify.parse_version(older) < verify.parse_version(newer)
    assert verify.parse_version("1.2") == verify.parse_version("1.2.0")


@pytest.mark.parametrize("text", ["", "v1.2", "1.2.0-dev", "latest", "1..2"])
def test_versions_that_are_not_releases_are_rejected(text):
    with pytest.raises(ValueError):
        verify.parse_version(text)


@pytest.mark.parametrize("name", ["/etc/passwd", "a/../../b", "..", "a\\b", "", "a/\x00", "./"])
def test_unsafe_relative_paths(name):
    assert verify.safe_relative_path(name) is None


def test_safe_relative_paths_are_normalized():
    assert str(verify.safe_relative_path("./a//b/./c")) == "a/b/c"


def test_docs_show_the_exit_status_table_of_the_code():
    documented = {}
    for line in (ROOT / "docs" / "bundle.md").read_text().splitlines():
        match = re.match(r"^\| (\d+) \| `(\w+)` \|", line)
        if match:
            documented[match[2]] = int(match[1])
    assert documented == {code: status for code, (status, _) in verify.REFUSALS.items()}
