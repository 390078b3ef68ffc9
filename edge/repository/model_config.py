"""``config.pbtxt``: Triton's model configuration as protobuf text, parsed into ModelConfig.

The schema is the subset in ``proto/model_config.proto``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format

from edge.core.errors import RepositoryError
from edge.core.types import KSERVE_TO_NUMPY, TensorSpec
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


def parse_model_config_any(text: str, source: str = CONFIG_NAME) -> model_config_pb2.ModelConfig:
    """Parse a ModelConfig given as protobuf text or as JSON (the form Triton's load API takes).

    Raises:
        RepositoryError: the text is malformed; the message names ``source`` and the field.
    """
    if text.lstrip().startswith("{"):
        try:
            return json_format.Parse(text, model_config_pb2.ModelConfig(),
                                     ignore_unknown_fields=True)
        except json_format.ParseError as exc:
            raise RepositoryError(f"{source}: {exc}") from exc
    return parse_model_config(text, source)


def config_datatype_to_kserve(data_type: int) -> str:
    """``TYPE_FP32`` -> ``FP32``; the KServe v2 name of a config.pbtxt data type.

    Raises:
        RepositoryError: the type has no tensor form mededge serves (STRING, BF16, INVALID).
    """
    name = model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")
    if name not in KSERVE_TO_NUMPY:
        raise RepositoryError(f"data type TYPE_{name} is not supported")
    return name


def kserve_to_config_datatype(datatype: str) -> int:
    """``FP32`` -> ``TYPE_FP32`` (the enum value)."""
    return int(model_config_pb2.DataType.Value(f"TYPE_{datatype}"))


def config_tensor_specs(config: model_config_pb2.ModelConfig,
                        source: str = CONFIG_NAME) -> tuple[tuple[TensorSpec, ...],
                                                            tuple[TensorSpec, ...]]:
    """The inputs and outputs a config declares, as TensorSpecs (dims exclude the batch axis).

    Raises:
        RepositoryError: a tensor has no name or an unsupported data type; names the field.
    """
    def specs(items: Iterable[Any], kind: str) -> tuple[TensorSpec, ...]:
        out = []
        for index, item in enumerate(items):
            if not item.name:
                raise RepositoryError(f"{source}: {kind}[{index}].name: missing")
            try:
                datatype = config_datatype_to_kserve(item.data_type)
            except RepositoryError as exc:
                raise RepositoryError(f"{source}: {kind}[{index}].data_type: {exc}") from exc
            out.append(TensorSpec(item.name, datatype, tuple(int(d) for d in item.dims)))
        return tuple(out)

    return specs(config.input, "input"), specs(config.output, "output")
