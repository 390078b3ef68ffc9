"""``config.pbtxt``: Triton's model configuration as protobuf text, parsed into ModelConfig.

The schema is the subset in ``proto/model_config.proto``.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format

from edge.core.errors import RepositoryError
from edge.protos import model_config_pb2

CONFIG_NAME = "config.pbtxt"
ModelConfig = model_config_pb2.ModelConfig


def format_model_config(config: model_config_pb2.ModelConfig) -> str:
    """The protobuf text form of ``config``, as written to config.pbtxt."""
    return text_format.MessageToString(config)


def parse_model_config(text: str, source: str = CONFIG_NAME) -> model_config_pb2.ModelConfig:
    """Parse config.pbtxt text.

    Raises:
        RepositoryError: the text is malformed; the message names ``source`` and the field.
    """
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig(), allow_unknown_field=True)
    except text_format.ParseError as exc:
        raise RepositoryError(f"{source}: {exc}") from exc


def read_model_config(model_dir: Path) -> model_config_pb2.ModelConfig:
    """Read ``model_dir/config.pbtxt``.

    Raises:
        RepositoryError: missing or malformed; the message names the file.
    """
    path = model_dir / CONFIG_NAME
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise RepositoryError(f"{path}: missing model configuration") from exc
    return parse_model_config(text, str(path))
