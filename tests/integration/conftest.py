"""Real parts shared by integration tests: the runner image built once per session and a
docker-registry on a free loopback port that holds it (used by images/ and execution/).

Downloads (.deb, wheels) go through the normal package cache ($ANIMUS_CACHE_DIR, default
~/.cache/animus), so a second run downloads nothing; everything else lives in pytest's
temporary directories.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.images.build import BuiltImage, build_image
from appliance.images.definition import load_definition
from appliance.images.layout import Layout
from appliance.images.registry import RegistryClient, push_image
from appliance.images.registry_server import RegistrySettings, RunningRegistry, start_registry

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_test_registry(state_dir: Path, **settings: Any) -> RunningRegistry:
    """docker-registry on a free loopback port, logging into its state directory."""
    state_dir.mkdir(parents=True, exist_ok=True)
    config = RegistrySettings(state_dir=state_dir, listen=f"127.0.0.1:{free_port()}", **settings)
    return start_registry(config, log=state_dir / "registry.log")


@pytest.fixture(scope="session")
def runner_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """The runner image built from its committed lock (once per session)."""
    output = tmp_path_factory.mktemp("runner-layout")
    return build_image(load_definition(REPO_ROOT / "images" / "runner"), output)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """A real docker-registry shared by the session's tests (which never corrupt it)."""
    with start_test_registry(tmp_path_factory.mktemp("registry")) as running:
        yield running


@pytest.fixture(scope="session")
def registry_client(registry: RunningRegistry) -> RegistryClient:
    return RegistryClient(registry.address)


@pytest.fixture(scope="session")
def pushed_runner(runner_image: BuiltImage, registry_client: RegistryClient) -> str:
    """``REGISTRY/animus/runner@sha256:…`` of the runner image in the session registry."""
    layout = Layout(runner_image.layout)
    result = push_image(layout, layout.image(), registry_client, "animus/runner", tag="latest")
    return result.reference
