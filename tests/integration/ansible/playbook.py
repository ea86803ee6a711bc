"""Running the repository's Ansible content the way install.sh does, and reading its recap."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
ANSIBLE_DIR = REPO_ROOT / "ansible"
VENV_BIN = Path(sys.prefix) / "bin"

_RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)


@dataclass(frozen=True)
class PlayResult:
    returncode: int
    output: str

    def recap(self) -> dict[str, dict[str, int]]:
        """The PLAY RECAP line of each host: ok, changed, unreachable, failed."""
        recap = self.output.rpartition("PLAY RECAP")[2]
        return {
            m["host"]: {k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")}
            for m in _RECAP.finditer(recap)
        }

    def changed_tasks(self) -> list[str]:
        """The names of the tasks that reported a change (for failure messages)."""
        names, current = [], None
        for line in self.output.splitlines():
            if line.startswith(("TASK [", "RUNNING HANDLER [")):
                current = line.split("[", 1)[1].rsplit("]", 1)[0]
            elif line.startswith("changed:") and current:
                names.append(current)
        return names


def ansible_env(**extra: str) -> dict[str, str]:
    """The environment of a play: no ANIMUS_* settings leak in from the test process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANIMUS_")}
    env.update(
        {
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "PATH": f"{VENV_BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
        }
    )
    env.update(extra)
    return env


def run_playbook(
    ansible_dir: Path,
    inventory: str,
    extra_vars: dict[str, str],
    *args: str,
    ansible_playbook: Path = VENV_BIN / "ansible-playbook",
    timeout: float = 900,
    env: dict[str, str] | None = None,
) -> PlayResult:
    """``ansible-playbook -i ANSIBLE_DIR/inventories/INVENTORY/hosts.yml ANSIBLE_DIR/site.yml``
    with each extra variable as ``-e name=value``."""
    command = [
        str(ansible_playbook),
        "-i",
        str(ansible_dir / "inventories" / inventory / "hosts.yml"),
        str(ansible_dir / "site.yml"),
    ]
    for name, value in extra_vars.items():
        command += ["-e", f"{name}={value}"]
    proc = subprocess.run(
        [*command, *args],
        cwd="/",
        env=env or ansible_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return PlayResult(proc.returncode, proc.stdout + proc.stderr)
