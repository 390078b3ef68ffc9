"""Health, metadata and configuration RPCs through tritonclient."""

from __future__ import annotations

import json

import pytest


def test_server_live_and_ready(client) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()


def test_server_metadata_names_mededge(client) -> None:
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "mededge"
    assert "model_repository" in meta["extensions"]


def test_model_metadata_has_batch_axis_and_types(client) -> None:
    meta = client.get_model_metadata("affine", as_json=True)
    assert meta["name"] == "affine"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
    assert inputs == {"x": ("FP32", ["-1", "4"]), "k": ("INT32", ["-1", "4"])}
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]}
    assert outputs == {"y": ("FP32", ["-1", "4"]), "z": ("INT32", ["-1", "4"])}


def test_model_ready(client) -> None:
    assert client.is_model_ready("affine")
    assert client.is_model_ready("affine", "1")
    assert not client.is_model_ready("affine", "7")


def test_model_config_round_trips_config_pbtxt(client) -> None:
    config = client.get_model_config("affine").config
    assert config.name == "affine"
    assert config.max_batch_size == 8
    assert [i.name for i in config.input] == ["x", "k"]
    assert list(config.input[0].dims) == [4]


def test_model_config_carries_the_sidecar(client) -> None:
    config = client.get_model_config("seg").config
    sidecar = json.loads(config.parameters["mededge.sidecar"].string_value)
    assert sidecar["task"] == "segment"
    assert sidecar["labels"] == ["background", "lung"]
    assert sidecar["preprocess"]["height"] == 8
    assert "mededge.sidecar" not in client.get_model_config("affine").config.parameters


def test_unknown_model_metadata_is_not_found(client, grpcclient) -> None:
    with pytest.raises(grpcclient.InferenceServerException) as err:
        client.get_model_metadata("no_such_model")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in err.value.message()
