"""Reading Triton-layout repositories: real configs, malformed ones, versions, integrity."""

from __future__ import annotations

from pathlib import Path

import pytest
from model_factory import add_scale, add_scale_config, write_add_scale_repo, write_version

from edge.core.errors import RepositoryError
from edge.core.types import Task
from edge.preprocess.imaging import PreprocessSpec
from edge.repository.loader import list_models, model_fingerprint, read_model, verify_version
from edge.repository.model_config import (
    ModelConfig,
    config_tensor_specs,
    parse_model_config,
    parse_model_config_any,
    read_model_config,
)
from edge.repository.publish import publish_version
from edge.repository.sidecar import Sidecar

# What a Triton user actually writes: warm-up, TensorRT accelerator, instance groups, batching.
REALISTIC = """
name: "densenet_onnx"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { latest { num_versions: 2 } }
input [
  {
    name: "data_0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
    reshape: { shape: [ 1, 3, 224, 224 ] }
  }
]
output [
  {
    name: "fc6_1"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    label_filename: "densenet_labels.txt"
  }
]
instance_group [ { count: 2 kind: KIND_CPU } ]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 50000 }
}
optimization {
  graph { level: 1 }
  execution_accelerators {
    gpu_execution_accelerator: [
      { name: "tensorrt" parameters { key: "precision_mode" value: "FP16" } }
    ]
  }
  input_pinned_memory { enable: true }
}
model_warmup [
  {
    name: "zeros"
    batch_size: 1
    inputs {
      key: "data_0"
      value: { data_type: TYPE_FP32 dims: [ 3, 224, 224 ] zero_data: true }
    }
  }
]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
response_cache { enable: false }
model_transaction_policy { decoupled: false }
metric_tags { key: "site" value: "ct-1" }
some_field_from_a_newer_triton: 3
"""


def test_realistic_triton_config_parses_with_every_field() -> None:
    config = parse_model_config(REALISTIC)
    assert config.max_batch_size == 8
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert config.instance_group[0].count == 2
    assert config.optimization.execution_accelerators.gpu_execution_accelerator[0].name == \
        "tensorrt"
    assert config.model_warmup[0].inputs["data_0"].zero_data
    assert config.version_policy.latest.num_versions == 2
    inputs, outputs = config_tensor_specs(config)
    assert inputs[0].shape == (3, 224, 224) and outputs[0].datatype == "FP32"


def test_ensemble_and_sequence_configs_parse() -> None:
    ensemble = parse_model_config("""
      name: "pipe" platform: "ensemble" max_batch_size: 4
      ensemble_scheduling { step [
        { model_name: "pre" model_version: -1 input_map { key: "IN" value: "RAW" }
          output_map { key: "OUT" value: "pre_out" } },
        { model_name: "cls" model_version: -1 input_map { key: "x" value: "pre_out" } } ] }
    """)
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == ["pre", "cls"]
    sequence = parse_model_config("""
      name: "seq" max_batch_size: 2
      sequence_batching { max_sequence_idle_microseconds: 5000000
        control_input [ { name: "START" control [ { kind: CONTROL_SEQUENCE_START
                                                    fp32_false_true: [ 0, 1 ] } ] } ]
        oldest { max_candidate_sequences: 4 } }
    """)
    assert sequence.sequence_batching.control_input[0].name == "START"


def test_json_config_parses_as_the_load_api_sends_it() -> None:
    config = parse_model_config_any('{"name": "m", "max_batch_size": 4, "unknown_key": 1}')
    assert config.max_batch_size == 4


def test_malformed_config_names_file_and_field(tmp_path: Path) -> None:
    model_dir = write_add_scale_repo(tmp_path, "add")
    (model_dir / "config.pbtxt").write_text('name: "add"\nmax_batch_size: "eight"\n')
    with pytest.raises(RepositoryError) as err:
        read_model_config(model_dir)
    assert str(model_dir / "config.pbtxt") in str(err.value)
    assert "max_batch_size" in str(err.value)


def test_missing_config_names_the_file(tmp_path: Path) -> None:
    write_version(tmp_path, "bare", 1)
    with pytest.raises(RepositoryError, match=r"bare/config\.pbtxt: missing"):
        read_model(tmp_path, "bare")


def test_config_name_must_match_folder(tmp_path: Path) -> None:
    write_add_scale_repo(tmp_path, "add", config=add_scale_config("other"))
    with pytest.raises(RepositoryError, match="name: 'other' does not match"):
        read_model(tmp_path, "add")


def test_triton_only_repo_reads_without_sidecar(tmp_path: Path) -> None:
    write_add_scale_repo(tmp_path, "add", versions=(1, 2, 3))
    (tmp_path / "add" / ".staging-x").mkdir()
    (tmp_path / ".hidden").mkdir()
    assert list_models(tmp_path) == ["add"]
    source = read_model(tmp_path, "add")
    assert source.sidecar is None
    assert source.platform == "onnxruntime"
    assert [v.model_id.version for v in source.versions] == [3]  # latest 1 by default
    assert source.versions[0].model_path == tmp_path / "add" / "3" / "model.onnx"


@pytest.mark.parametrize(("policy", "serve", "missing"), [
    ("", [3], []),
    ("version_policy: { latest { num_versions: 2 } }", [2, 3], []),
    ("version_policy: { all { } }", [1, 2, 3], []),
    ("version_policy: { specific { versions: [ 1, 3, 7 ] } }", [1, 3], [7]),
])
def test_version_policy(tmp_path: Path, policy: str, serve: list[int], missing: list[int]) -> None:
    write_add_scale_repo(tmp_path, "add", versions=(1, 2, 3),
                         config=add_scale_config("add", extra=policy))
    source = read_model(tmp_path, "add")
    assert [v.model_id.version for v in source.versions] == serve
    assert list(source.missing) == missing


def test_platform_inferred_from_files_when_config_omits_it(tmp_path: Path) -> None:
    write_version(tmp_path, "auto", 1)
    (tmp_path / "auto" / "config.pbtxt").write_text("max_batch_size: 4\n")
    assert read_model(tmp_path, "auto").platform == "onnxruntime"


def _sidecar() -> Sidecar:
    return Sidecar(task=Task.CLASSIFY, labels=("a", "b"),
                   preprocess=PreprocessSpec(height=16, width=16))


def test_sha256_recorded_by_publish_verifies_and_mismatch_is_refused(tmp_path: Path) -> None:
    onnx_file = add_scale(tmp_path / "build" / "model.onnx")
    config = parse_model_config(add_scale_config("cls"))
    repo = tmp_path / "repo"
    version = publish_version(repo, "cls", {"model.onnx": onnx_file}, config, _sidecar())
    source = read_model(repo, "cls")
    assert source.sidecar is not None and source.sidecar.versions[version].files
    verify_version(source.versions[0], source.sidecar)  # intact: no error

    model_path = repo / "cls" / str(version) / "model.onnx"
    model_path.write_bytes(model_path.read_bytes() + b"\0")
    with pytest.raises(RepositoryError, match=r"model\.onnx: sha256 .* does not match"):
        verify_version(read_model(repo, "cls").versions[0], source.sidecar)
    model_path.unlink()
    with pytest.raises(RepositoryError, match="recorded in mededge.yaml but missing"):
        verify_version(read_model(repo, "cls").versions[0], source.sidecar)


def test_fingerprint_changes_with_config_and_versions(tmp_path: Path) -> None:
    write_add_scale_repo(tmp_path, "add")
    first = model_fingerprint(tmp_path, "add")
    assert model_fingerprint(tmp_path, "add") == first
    write_version(tmp_path, "add", 2)
    second = model_fingerprint(tmp_path, "add")
    assert second != first
    (tmp_path / "add" / "config.pbtxt").write_text(add_scale_config("add", max_batch_size=4))
    assert model_fingerprint(tmp_path, "add") != second


def test_config_round_trips_through_text() -> None:
    config = parse_model_config(REALISTIC)
    again = parse_model_config(str(config))
    assert again == config
    assert isinstance(again, ModelConfig)
