"""Softmax and sigmoid: correct values and no overflow on extreme logits."""

import numpy as np
import pytest

from edge.postprocess.activations import sigmoid, softmax


def test_softmax_matches_the_definition_and_sums_to_one() -> None:
    x = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    expected = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    out = softmax(x, axis=1)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)


def test_softmax_is_stable_for_huge_logits_and_works_on_the_class_axis_first() -> None:
    x = np.array([[1000.0, -1000.0], [1001.0, -1000.0]])  # (C=2, N=2)
    out = softmax(x, axis=0)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[:, 0], [1 / (1 + np.e), np.e / (1 + np.e)])


def test_softmax_rejects_an_empty_class_axis() -> None:
    with pytest.raises(ValueError, match="empty class axis"):
        softmax(np.zeros((3, 0)))


def test_sigmoid_values_and_extremes_without_overflow_warnings() -> None:
    x = np.array([-1000.0, -1.0, 0.0, 1.0, 1000.0], dtype=np.float32)
    with np.errstate(over="raise"):
        out = sigmoid(x)
    np.testing.assert_allclose(out, [0.0, 1 / (1 + np.e), 0.5, np.e / (1 + np.e), 1.0], atol=1e-7)
    assert out.dtype == np.float32
