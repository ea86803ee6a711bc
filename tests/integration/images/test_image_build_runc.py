"""The runner image: reproducible, and its Python runs under runc with the sandbox defaults."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

from click.testing import CliRunner

from appliance.images.build import LABEL_LOCK_DIGEST, BuiltImage
from appliance.images.cli import image_group
from appliance.images.definition import load_definition
from appliance.images.layout import Layout
from appliance.images.lock import read_lock
from appliance.images.runtime import Limits
from appliance.images.unpack import unpack_image

REPO_ROOT = Path(__file__).resolve().parents[3]

PROBE = r"""
import errno, json, os, socket, sys, sqlite3, ssl, decimal, ctypes, zoneinfo
result = {"uid": os.getuid(), "gid": os.getgid(), "python": sys.version.split()[0]}
try:
    open("/usr/lib/planted", "w")
    result["root_write"] = "allowed"
except OSError as exc:
    result["root_write"] = errno.errorcode[exc.errno]
try:
    socket.create_connection(("192.0.2.1", 80), timeout=2)
    result["network"] = "connected"
except OSError as exc:
    result["network"] = errno.errorcode.get(exc.errno, str(exc))
with open("/proc/net/route") as routes:
    result["routes"] = len(routes.read().splitlines()) - 1
with open("/scratch/out.txt", "w") as out:
    out.write("ok")
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines())
result["cap_eff"] = status["CapEff"].strip()
result["no_new_privs"] = status["NoNewPrivs"].strip()
result["seccomp"] = status["Seccomp"].strip()
print(json.dumps(result))
"""


def test_runner_built_twice_has_the_same_digest_and_bytes(
    runner_image: BuiltImage, tmp_path: Path
) -> None:
    second = tmp_path / "second"
    result = CliRunner().invoke(
        image_group,
        ["build", str(REPO_ROOT / "images" / "runner"), "--output", str(second), "--json"],
    )
    assert result.exit_code == 0, result.output
    built = json.loads(result.stdout.strip().splitlines()[-1])
    assert built["manifest_digest"] == runner_image.manifest_digest
    first_blobs = runner_image.layout / "blobs" / "sha256"
    names = sorted(p.name for p in first_blobs.iterdir())
    assert names == sorted(p.name for p in (second / "blobs" / "sha256").iterdir())
    _, mismatch, errors = filecmp.cmpfiles(
        first_blobs, second / "blobs" / "sha256", names, shallow=False
    )
    assert (mismatch, errors) == ([], [])


def test_runner_config_names_a_user_entrypoint_and_its_lock(runner_image: BuiltImage) -> None:
    config = Layout(runner_image.layout).image().config["config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["/usr/bin/python3"]
    assert "LANG=C.UTF-8" in config["Env"]
    lock = read_lock(load_definition(REPO_ROOT / "images" / "runner"))
    assert config["Labels"][LABEL_LOCK_DIGEST] == lock.digest
    assert "org.opencontainers.image.revision" in config["Labels"]


def test_runner_python_runs_under_runc_as_non_root_read_only_without_network(
    runner_image: BuiltImage, tmp_path: Path, run_container
) -> None:
    layout = Layout(runner_image.layout)
    image = layout.image()
    rootfs = unpack_image(layout, image, tmp_path / "rootfs")
    proc = run_container(rootfs, image.config, ["-c", PROBE])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["uid"], result["gid"]) == (10001, 10001)
    assert result["python"].startswith("3.11.")
    assert result["root_write"] == "EROFS"
    assert result["network"] == "ENETUNREACH"
    assert result["routes"] == 0
    assert result["cap_eff"] == "0000000000000000"
    assert result["no_new_privs"] == "1"
    assert result["seccomp"] == "2"


def test_memory_limit_is_enforced(runner_image: BuiltImage, tmp_path: Path, run_container):
    layout = Layout(runner_image.layout)
    image = layout.image()
    rootfs = unpack_image(layout, image, tmp_path / "rootfs")
    proc = run_container(
        rootfs,
        image.config,
        ["-c", "x = bytearray(300 << 20); print('survived')"],
        limits=Limits(memory_bytes=100 << 20),
    )
    assert proc.returncode == 137
    assert "survived" not in proc.stdout
