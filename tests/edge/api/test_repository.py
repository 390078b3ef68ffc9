"""RepositoryIndex, RepositoryModelLoad (with a config override), RepositoryModelUnload."""

from __future__ import annotations

import json

import numpy as np
import pytest


def _index(client) -> dict[str, dict]:
    return {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}


def test_index_lists_ready_models(client) -> None:
    index = _index(client)
    assert {"affine", "slow", "seg", "spare"} <= set(index)
    assert index["affine"]["state"] == "READY"
    assert index["affine"]["version"] == "1"


def test_unload_then_infer_is_unavailable_then_load(client, grpcclient) -> None:
    client.unload_model("spare")
    assert not client.is_model_ready("spare")
    assert _index(client)["spare"].get("state") != "READY"
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    k = grpcclient.InferInput("k", [1, 4], "INT32")
    k.set_data_from_numpy(np.ones((1, 4), np.int32))
    with pytest.raises(grpcclient.InferenceServerException) as err:
        client.infer("spare", [x, k])
    assert err.value.status() == "StatusCode.UNAVAILABLE"
    client.load_model("spare")
    assert client.is_model_ready("spare")
    assert client.infer("spare", [x, k]).as_numpy("z").tolist() == [[-1, -1, -1, -1]]


def test_load_with_config_override(client) -> None:
    config = client.get_model_config("spare", as_json=True)["config"]
    config["max_batch_size"] = 2
    client.load_model("spare", config=json.dumps(config))
    try:
        assert client.get_model_config("spare").config.max_batch_size == 2
    finally:
        client.load_model("spare")
    assert client.get_model_config("spare").config.max_batch_size == 8


def test_load_of_a_missing_folder_fails_naming_it(client, grpcclient) -> None:
    with pytest.raises(grpcclient.InferenceServerException) as err:
        try:
            client.load_model("ghost")
        finally:  # a model asked for and not ready makes the server not ready (strict)
            client.unload_model("ghost")
    # A RepositoryError (the folder is missing): FAILED_PRECONDITION, as edge.api.errors maps it.
    assert err.value.status() == "StatusCode.FAILED_PRECONDITION"
    assert "ghost" in err.value.message()
