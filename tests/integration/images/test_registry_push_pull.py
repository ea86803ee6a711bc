"""Push → pull by digest against a real docker-registry; verification catches corruption."""

from __future__ import annotations

import filecmp
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from appliance.errors import AnimusError
from appliance.images import registry as registry_module
from appliance.images.build import BuiltImage
from appliance.images.cli import image_group
from appliance.images.layout import MEDIA_TYPE_MANIFEST, Layout
from appliance.images.progress import Progress
from appliance.images.registry import (
    RegistryClient,
    parse_reference,
    pull_image,
    push_image,
    verify_image,
)
from appliance.images.registry_server import RegistrySettings, RunningRegistry
from appliance.images.unpack import pull_and_unpack


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_push_then_pull_by_digest_round_trips(
    runner_image: BuiltImage, pushed_runner: str, registry_client: RegistryClient, tmp_path: Path
) -> None:
    store = Layout(tmp_path / "store")
    image = pull_image(parse_reference(pushed_runner), registry_client, store)
    assert image.manifest_digest == runner_image.manifest_digest
    source = runner_image.layout / "blobs" / "sha256"
    for blob in image.blobs:
        name = blob["digest"].split(":")[1]
        assert filecmp.cmp(source / name, store.blob_path(blob["digest"]), shallow=False)


def test_pushing_again_uploads_nothing(
    runner_image: BuiltImage, pushed_runner: str, registry_client: RegistryClient
) -> None:
    layout = Layout(runner_image.layout)
    result = push_image(layout, layout.image(), registry_client, "animus/runner")
    assert result.uploaded == [] and len(result.skipped) == 3
    assert result.reference == pushed_runner


def test_a_tag_never_overrides_a_digest(
    pushed_runner: str, registry_client: RegistryClient, tiny_layout, tmp_path: Path
) -> None:
    other = tiny_layout("moved tag")
    pushed = push_image(other, other.image(), registry_client, "animus/runner", tag="latest")
    assert pushed.manifest_digest != parse_reference(pushed_runner).digest
    # The tag now names the other image, yet a reference carrying both tag and digest still
    # yields the image of the digest.
    tagged = requests.get(
        f"http://{registry_client.registry}/v2/animus/runner/manifests/latest",
        headers={"Accept": MEDIA_TYPE_MANIFEST},
        timeout=10,
    )
    assert tagged.headers["Docker-Content-Digest"] == pushed.manifest_digest
    runner_ref = parse_reference(pushed_runner)
    both = parse_reference(f"{runner_ref.registry}/animus/runner:latest@{runner_ref.digest}")
    image = pull_image(both, registry_client, Layout(tmp_path / "store"))
    assert image.manifest_digest == runner_ref.digest


class _InterruptAfter(Progress):
    """Simulates a push killed part-way: raises once LIMIT bytes of a blob are sent."""

    def __init__(self, limit: int):
        self.limit = limit
        self.first_report: dict[str, int] = {}

    def transfer(self, label: str, done: int, total: int) -> None:
        self.first_report.setdefault(label, done)
        if self.limit and done >= self.limit:
            raise KeyboardInterrupt


def test_interrupted_push_resumes_where_the_registry_stopped(
    runner_image: BuiltImage,
    registry_client: RegistryClient,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("ANIMUS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(registry_module, "CHUNK_SIZE", 1 << 20)
    layout = Layout(runner_image.layout)
    image = layout.image()
    big = max(image.blobs, key=lambda b: b["size"])
    with pytest.raises(KeyboardInterrupt):
        push_image(
            layout,
            image,
            registry_client,
            "resume/runner",
            workers=1,
            progress=_InterruptAfter(3 << 20),
        )
    resumed = _InterruptAfter(0)
    result = push_image(layout, image, registry_client, "resume/runner", progress=resumed)
    assert big["digest"] in result.uploaded
    # The first chunk sent after the restart ends at 4 MiB: the first 3 MiB were not re-sent.
    assert resumed.first_report[big["digest"]] == 4 << 20
    pulled = pull_image(
        parse_reference(result.reference), registry_client, Layout(tmp_path / "store")
    )
    assert pulled.manifest_digest == image.manifest_digest


def test_cli_push_and_verify(
    runner_image: BuiltImage, registry: RunningRegistry, tiny_layout
) -> None:
    layout = tiny_layout("cli")
    runner = CliRunner()
    pushed = runner.invoke(
        image_group, ["push", str(layout.root), f"{registry.address}/animus/cli:v1"]
    )
    assert pushed.exit_code == 0, pushed.output
    reference = pushed.stdout.strip().splitlines()[-1]
    assert reference == f"{registry.address}/animus/cli@{layout.image().manifest_digest}"
    verified = runner.invoke(image_group, ["verify", reference])
    assert verified.exit_code == 0, verified.output
    assert "2 blobs intact" in verified.stdout


def _corrupt(registry: RunningRegistry, digest: str) -> None:
    hexdigest = digest.split(":")[1]
    data = (
        registry.settings.storage
        / "docker/registry/v2/blobs/sha256"
        / hexdigest[:2]
        / hexdigest
        / "data"
    )
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0x01
    data.write_bytes(bytes(content))


def test_blob_corrupted_in_registry_storage_fails_verify_and_pull_naming_the_blob(
    runner_image: BuiltImage, tmp_path: Path, start_own_registry
) -> None:
    with start_own_registry() as own:
        client = RegistryClient(own.address)
        layout = Layout(runner_image.layout)
        image = layout.image()
        reference = push_image(layout, image, client, "animus/runner").reference
        layer = max(image.blobs, key=lambda b: b["size"])["digest"]
        _corrupt(own, layer)

        result = CliRunner().invoke(image_group, ["verify", reference])
        assert result.exit_code == 1
        assert "blob_digest_mismatch" in result.output and layer in result.output

        with pytest.raises(AnimusError) as caught:
            pull_image(parse_reference(reference), client, Layout(tmp_path / "store"))
        assert caught.value.code == "blob_digest_mismatch"
        assert caught.value.details["digest"] == layer
        assert not Layout(tmp_path / "store").has_blob(layer)

        with pytest.raises(AnimusError) as caught:
            pull_and_unpack(reference, client, cache=tmp_path / "cache")
        assert layer in caught.value.message
        assert not (tmp_path / "cache" / "rootfs").exists()

        with pytest.raises(AnimusError) as caught:
            verify_image(parse_reference(reference), client)
        assert caught.value.details["bad_blobs"] == [layer]


def test_skopeo_reads_our_pushed_image_with_the_same_digest(
    pushed_runner: str, runner_image: BuiltImage, tmp_path: Path
) -> None:
    """An independent client (skopeo) accepts the manifest and blobs we built and pushed."""
    copy = tmp_path / "copy"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            f"docker://{pushed_runner}",
            f"oci:{copy}:runner",
        ],
        check=True,
    )
    assert Layout(copy).image("runner").manifest_digest == runner_image.manifest_digest


def test_cli_pull_unpacks_into_the_cache(
    pushed_runner: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANIMUS_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(image_group, ["pull", pushed_runner, "--unpack"])
    assert result.exit_code == 0, result.output
    rootfs = Path(result.stdout.strip().splitlines()[-1])
    assert rootfs.is_relative_to(tmp_path / "cache")
    assert (rootfs / "usr/bin/python3.11").is_file()
    assert (rootfs / "etc/passwd").read_text().count("animus:x:10001") == 1


def test_registry_serve_command_runs_the_registry(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance.images.cli",
            "registry",
            "serve",
            "--state-dir",
            str(tmp_path / "state"),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        cwd=Path(__file__).resolve().parents[3],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        RunningRegistry(
            RegistrySettings(state_dir=tmp_path / "state", listen=f"127.0.0.1:{port}"), process
        ).wait_ready()
        assert (tmp_path / "state/config.yml").read_text().count(f"127.0.0.1:{port}") == 1
    finally:
        process.terminate()
        process.wait(timeout=10)
