"""Real parts for image tests: registries of a test's own, tiny layouts, and runc to run
containers. The runner image and the session registry come from ../conftest.py."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.images.build import write_image
from appliance.images.layer import LayerBuilder
from appliance.images.layout import Layout
from appliance.images.registry_server import RunningRegistry
from appliance.images.runtime import Limits, runtime_config, write_bundle
from tests.integration.conftest import start_test_registry


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
