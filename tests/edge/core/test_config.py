"""Settings: file, environment and flag precedence; errors that name the key."""

from pathlib import Path

import pytest

from edge.core.config import load_settings
from edge.core.errors import ConfigError


def test_defaults_follow_triton_ports() -> None:
    settings = load_settings(environ={})
    assert settings.server.grpc_port == 8001
    assert settings.server.http_port == 8002
    assert settings.grpc.max_message_bytes >= 256 * 1024 * 1024


def test_file_then_env_then_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "mededge.yaml"
    cfg.write_text("server:\n  grpc_port: 9001\n  http_port: 9002\n")
    env = {"MEDEDGE_SERVER__HTTP_PORT": "9102", "MEDEDGE_SCHEDULER__MAX_QUEUE_SIZE": "7"}
    settings = load_settings(cfg, overrides={"server": {"grpc_port": 9201}}, environ=env)
    assert settings.server.grpc_port == 9201
    assert settings.server.http_port == 9102
    assert settings.scheduler.max_queue_size == 7


def test_unknown_key_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("server:\n  grpc_prot: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: server\.grpc_prot"):
        load_settings(cfg, environ={})


def test_invalid_value_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("server:\n  grpc_port: 70000\n")
    with pytest.raises(ConfigError, match=r"server\.grpc_port"):
        load_settings(cfg, environ={})


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml", environ={})
    cfg = tmp_path / "list.yaml"
    cfg.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(cfg, environ={})
