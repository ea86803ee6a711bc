"""Secret providers: values are read by reference when a Run needs them, never stored by us.

The file provider reads ``<root>/<project_id>/<NAME>``, a directory the operator fills and
protects (mode 0700, files 0600); another provider (a vault) implements the same interface.
"""

from __future__ import annotations

import abc
import re
from pathlib import Path

from appliance.errors import NotFound

SECRET_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


class SecretProvider(abc.ABC):
    @abc.abstractmethod
    def read(self, project_id: str, name: str) -> str:
        """The current value of secret ``name`` granted to ``project_id``; NotFound if none."""


class FileSecretProvider(SecretProvider):
    def __init__(self, root: Path):
        self.root = Path(root)

    def read(self, project_id: str, name: str) -> str:
        if not SECRET_NAME.match(name) or not re.match(r"^prj_[0-9a-z]+$", project_id):
            raise NotFound(f"no secret {name!r}")
        path = self.root / project_id / name
        try:
            return path.read_text().rstrip("\n")
        except FileNotFoundError:
            raise NotFound(f"no secret {name!r} is provisioned for this project") from None
