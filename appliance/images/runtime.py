"""OCI runtime configs (``config.json`` for runc) with the sandbox defaults of DESIGN §7.

No network (a fresh network namespace with only a loopback device that is down), a non-root
user, read-only root with a writable scratch directory and a private /tmp, no capabilities,
no new privileges, a seccomp filter, CPU/memory/pids limits, masked and read-only kernel
paths. Callers loosen nothing here; a policy that allows egress is the Data Plane's business.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import AnimusError

OCI_RUNTIME_VERSION = "1.0.2"
SCRATCH_MOUNT = "/scratch"
MOUNTPOINTS = ("proc", "dev", "sys", "tmp", "scratch")

MASKED_PATHS = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
]
READONLY_PATHS = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
]

#: Syscalls a run never needs and that widen the kernel's attack surface. A deny list over
#: an allow-all default, see docs/adr/0004: with no capabilities most of these already fail,
#: the filter makes that independent of capability bugs.
DENIED_SYSCALLS = [
    "acct",
    "add_key",
    "bpf",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "personality",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "swapoff",
    "swapon",
    "syslog",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vhangup",
    "create_module",
    "_sysctl",
    "sysfs",
    "chroot",
]
_CLONE_NEWUSER = 0x10000000
_EPERM = 1
_ENOSYS = 38


@dataclass(frozen=True)
class Limits:
    """Resource limits of one container."""

    memory_bytes: int = 2 << 30
    cpus: float = 1.0
    pids: int = 256
    tmp_bytes: int = 256 << 20
    nofile: int = 1024


def seccomp_profile() -> dict[str, Any]:
    """The seccomp filter every run gets."""
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": sorted(DENIED_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": _EPERM},
            # glibc falls back to clone() when clone3 is missing; clone3's flags live in
            # memory where seccomp cannot see them, so it cannot be filtered by flag.
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": _ENOSYS},
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": _EPERM,
                "args": [
                    {
                        "index": 0,
                        "value": _CLONE_NEWUSER,
                        "valueTwo": _CLONE_NEWUSER,
                        "op": "SCMP_CMP_MASKED_EQ",
                    }
                ],
            },
        ],
    }


def resolve_user(rootfs: Path, user: str) -> tuple[int, int]:
    """``uid[:gid]`` or ``name[:group]`` of an image config, looked up in the image's
    /etc/passwd and /etc/group (never the host's). Root is refused."""
    name, _, group = user.partition(":")

    def lookup(file: str, key: str, field: int) -> int:
        if key.isdigit():
            return int(key)
        try:
            lines = (rootfs / "etc" / file).read_text().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            parts = line.split(":")
            if parts[0] == key and len(parts) > field:
                return int(parts[field])
        raise AnimusError(
            f"image user {key!r} is not in the image's /etc/{file}", code="invalid_request"
        )

    uid = lookup("passwd", name, 2)
    if group:
        gid = lookup("group", group, 2)
    elif name.isdigit():
        gid = uid
    else:
        gid = lookup("passwd", name, 3)
    if uid == 0 or gid == 0:
        raise AnimusError("containers never run as root", code="forbidden")
    return uid, gid


def runtime_config(
    image_config: dict[str, Any],
    rootfs: Path,
    *,
    args: list[str] | None = None,
    entrypoint: list[str] | None = None,
    env: dict[str, str] | None = None,
    scratch: Path | None = None,
    readonly_mounts: dict[str, Path] | None = None,
    limits: Limits = Limits(),
    hostname: str = "run",
) -> dict[str, Any]:
    """The OCI runtime ``config.json`` for running IMAGE_CONFIG (an OCI image config document)
    from ROOTFS.

    ARGS replace the image's Cmd (the Entrypoint stays unless ENTRYPOINT replaces it too);
    ENV is added to the image's Env;
    SCRATCH is bind-mounted read-write at /scratch; READONLY_MOUNTS maps container paths to
    host paths mounted read-only (inputs).
    """
    config = image_config.get("config", {})
    uid, gid = resolve_user(rootfs, config.get("User", ""))
    if entrypoint is None:
        entrypoint = list(config.get("Entrypoint") or [])
    process_args = list(entrypoint) + list(args if args is not None else config.get("Cmd") or [])
    if not process_args:
        raise AnimusError(
            "the image has no entrypoint and no command was given", code="invalid_request"
        )
    process_env = list(config.get("Env") or [])
    process_env += [f"{k}={v}" for k, v in sorted((env or {}).items())]

    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",  # noqa: S108 - a mount point inside the container
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {
            "destination": "/tmp",  # noqa: S108 - the container's private tmpfs
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777", f"size={limits.tmp_bytes}"],
        },
    ]
    if scratch is not None:
        mounts.append(
            {
                "destination": SCRATCH_MOUNT,
                "type": "bind",
                "source": str(scratch),
                "options": ["rbind", "rw", "nosuid", "nodev"],
            }
        )
    for target, source in sorted((readonly_mounts or {}).items()):
        mounts.append(
            {
                "destination": target,
                "type": "bind",
                "source": str(source),
                "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
            }
        )

    period = 100_000
    return {
        "ociVersion": OCI_RUNTIME_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid, "additionalGids": []},
            "args": process_args,
            "env": process_env,
            "cwd": config.get("WorkingDir") or "/",
            "capabilities": {
                "bounding": [],
                "effective": [],
                "inheritable": [],
                "permitted": [],
                "ambient": [],
            },
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": limits.nofile, "soft": limits.nofile},
                {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
            ],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "network"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
            ],
            "resources": {
                "devices": [{"allow": False, "access": "rwm"}],
                "memory": {"limit": limits.memory_bytes},
                "cpu": {"quota": int(limits.cpus * period), "period": period},
                "pids": {"limit": limits.pids},
            },
            "seccomp": seccomp_profile(),
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    }


def write_bundle(bundle: Path, config: dict[str, Any]) -> Path:
    """Write CONFIG as BUNDLE/config.json (the bundle runc runs); hand the scratch mount to
    the container user so that a non-root process can write there."""
    bundle.mkdir(parents=True, exist_ok=True)
    user = config["process"]["user"]
    for mount in config["mounts"]:
        if mount["destination"] == SCRATCH_MOUNT and os.geteuid() == 0:
            os.chown(mount["source"], user["uid"], user["gid"])
    path = bundle / "config.json"
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return path
