"""Real parts for image tests: the runner image built once per session, a docker-registry on a
free loopback port, and runc to run containers.

Downloads (.deb, wheels) go through the normal package cache ($ANIMUS_CACHE_DIR, default
~/.cache/animus), so a second run downloads nothing; everything else lives in pytest's
temporary directories.
"""

from __future__ import annotations

import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.images.build import BuiltImage, build_image, write_image
from appliance.images.definition import load_definition
from appliance.images.layer import LayerBuilder
from appliance.images.layout import Layout
from appliance.images.registry import RegistryClient, push_image
from appliance.images.registry_server import RegistrySettings, RunningRegistry, start_registry
from appliance.images.runtime import Limits, runtime_config, write_bundle

REPO_ROOT = Path(__file__).resolve().parents[3]


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


@pytest.fixture
def start_own_registry(tmp_path: Path) -> Iterator[Callable[..., RunningRegistry]]:
    """Start a registry of the test's own (for tests that corrupt storage or need TLS);
    every one started is stopped at the end of the test."""
    started: list[RunningRegistry] = []

    def start(**settings: Any) -> RunningRegistry:
        running = start_test_registry(tmp_path / f"registry-{len(started)}", **settings)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


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


@pytest.fixture
def tiny_layout(tmp_path: Path) -> Callable[[str], Layout]:
    """Make a small, valid image layout whose content depends on TEXT."""

    def make(text: str) -> Layout:
        builder = LayerBuilder()
        builder.add_file("hello.txt", text.encode())
        layer = builder.build()
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"User": "1000:1000", "Cmd": ["/hello"]},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
        }
        layout = Layout(tmp_path / f"tiny-{uuid.uuid4().hex[:8]}")
        write_image(layout, [layer], config, ref_name="tiny")
        return layout

    return make


@pytest.fixture
def run_container(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run a command in a fresh runc container from ROOTFS with the sandbox defaults."""

    def run(
        rootfs: Path,
        image_config: dict[str, Any],
        args: list[str],
        *,
        entrypoint: list[str] | None = None,
        limits: Limits | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess:
        name = uuid.uuid4().hex[:12]
        scratch = tmp_path / f"scratch-{name}"
        scratch.mkdir()
        bundle = tmp_path / f"bundle-{name}"
        config = runtime_config(
            image_config,
            rootfs,
            args=args,
            entrypoint=entrypoint,
            scratch=scratch,
            limits=limits or Limits(),
        )
        write_bundle(bundle, config)
        container = f"animus-test-{name}"
        try:
            return subprocess.run(
                ["runc", "run", "--bundle", str(bundle), container],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        finally:
            subprocess.run(["runc", "delete", "--force", container], capture_output=True)

    return run
