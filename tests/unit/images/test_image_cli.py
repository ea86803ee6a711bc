"""The image, registry and env command groups, through click's test runner."""

from __future__ import annotations

from click.testing import CliRunner

from appliance.images.cli import env_group, image_group, registry_group


def test_groups_are_named_for_the_top_level_cli() -> None:
    assert (image_group.name, registry_group.name, env_group.name) == ("image", "registry", "env")
    assert {"lock", "build", "push", "verify"} <= set(image_group.commands)
    assert "serve" in registry_group.commands and "build" in env_group.commands


def test_verify_needs_a_digest_and_says_so_without_a_traceback() -> None:
    result = CliRunner().invoke(image_group, ["verify", "127.0.0.1:1/animus/runner:latest"])
    assert result.exit_code == 1
    assert "invalid_digest" in result.output
    assert "Traceback" not in result.output


def test_registry_on_a_non_loopback_address_needs_tls(tmp_path) -> None:
    result = CliRunner().invoke(
        registry_group, ["serve", "--state-dir", str(tmp_path), "--listen", "0.0.0.0:5000"]
    )
    assert result.exit_code == 2
    assert "--tls" in result.output
