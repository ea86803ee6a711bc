"""The OCI runtime config carries the sandbox defaults of DESIGN §7."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import AnimusError
from appliance.images.runtime import Limits, resolve_user, runtime_config

IMAGE_CONFIG = {
    "config": {
        "User": "10001:10001",
        "Entrypoint": ["/usr/bin/python3"],
        "Cmd": ["-V"],
        "Env": ["PATH=/usr/bin", "LANG=C.UTF-8"],
        "WorkingDir": "/scratch",
    }
}


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nanimus:x:10001:10002::/:/x\n")
    (tmp_path / "etc/group").write_text("root:x:0:\nanimus:x:10002:\n")
    return tmp_path


def test_defaults_lock_the_container_down(rootfs: Path, tmp_path: Path) -> None:
    config = runtime_config(IMAGE_CONFIG, rootfs, scratch=tmp_path)
    process = config["process"]
    assert process["user"]["uid"] == 10001
    assert process["noNewPrivileges"] is True
    assert all(caps == [] for caps in process["capabilities"].values())
    assert config["root"] == {"path": str(rootfs), "readonly": True}
    namespaces = {ns["type"]: ns for ns in config["linux"]["namespaces"]}
    # A new network namespace (no path: not the host's) has no route anywhere.
    assert namespaces["network"] == {"type": "network"}
    assert {"pid", "ipc", "uts", "mount"} <= namespaces.keys()
    resources = config["linux"]["resources"]
    assert resources["memory"]["limit"] == Limits().memory_bytes
    assert resources["pids"]["limit"] == Limits().pids
    assert resources["cpu"]["quota"] == 100_000
    assert "/proc/kcore" in config["linux"]["maskedPaths"]
    assert "/proc/sys" in config["linux"]["readonlyPaths"]
    seccomp = config["linux"]["seccomp"]
    denied = {name for rule in seccomp["syscalls"] for name in rule["names"]}
    assert {"mount", "ptrace", "bpf", "unshare", "setns", "kexec_load"} <= denied
    scratch = [m for m in config["mounts"] if m["destination"] == "/scratch"]
    assert scratch[0]["source"] == str(tmp_path) and "rw" in scratch[0]["options"]


def test_args_replace_cmd_but_keep_entrypoint(rootfs: Path) -> None:
    config = runtime_config(IMAGE_CONFIG, rootfs, args=["-c", "pass"], env={"RUN_ID": "run_1"})
    assert config["process"]["args"] == ["/usr/bin/python3", "-c", "pass"]
    assert config["process"]["env"][-1] == "RUN_ID=run_1"
    assert config["process"]["cwd"] == "/scratch"


def test_inputs_are_mounted_read_only(rootfs: Path, tmp_path: Path) -> None:
    config = runtime_config(IMAGE_CONFIG, rootfs, readonly_mounts={"/inputs/ds": tmp_path})
    mount = next(m for m in config["mounts"] if m["destination"] == "/inputs/ds")
    assert "ro" in mount["options"] and "rw" not in mount["options"]


def test_user_names_are_resolved_in_the_image_not_on_the_host(rootfs: Path) -> None:
    assert resolve_user(rootfs, "animus") == (10001, 10002)
    assert resolve_user(rootfs, "animus:animus") == (10001, 10002)


@pytest.mark.parametrize("user", ["root", "0", "0:0", "10001:0", ""])
def test_root_is_refused(rootfs: Path, user: str) -> None:
    with pytest.raises(AnimusError):
        runtime_config({"config": {**IMAGE_CONFIG["config"], "User": user}}, rootfs)
