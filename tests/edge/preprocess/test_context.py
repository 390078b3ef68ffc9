"""2.5D inputs: each slice stacked with its neighbours along the normal, ends replicated."""

import numpy as np
import pytest

from edge.core.errors import ConfigError
from edge.preprocess.context import (
    channel_sources,
    context_positions,
    context_table,
    stack_context,
)
from edge.preprocess.imaging import PreprocessSpec


def test_positions_replicate_the_edges() -> None:
    assert context_positions(0, 5, 2) == (0, 0, 0, 1, 2)
    assert context_positions(2, 5, 2) == (0, 1, 2, 3, 4)
    assert context_positions(4, 5, 1) == (3, 4, 4)
    assert context_positions(0, 1, 1) == (0, 0, 0)
    np.testing.assert_array_equal(context_table(3, 1), [[0, 0, 1], [0, 1, 2], [1, 2, 2]])


def test_stack_puts_the_slice_in_the_middle_channel() -> None:
    slices = [np.full((1, 2, 3), float(v), np.float32) for v in range(4)]
    out = stack_context(slices, 1)
    assert out.shape == (4, 3, 2, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :, 0, 0], [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]])
    one = stack_context(np.stack(slices), 1, indices=[3])
    np.testing.assert_array_equal(one[0], out[3])
    np.testing.assert_array_equal(stack_context(slices, 0)[:, 0], np.stack(slices)[:, 0])


def test_stack_rejects_mixed_sizes_and_bad_indices() -> None:
    with pytest.raises(ValueError, match="one size"):
        stack_context([np.zeros((2, 2)), np.zeros((3, 2))], 1)
    with pytest.raises(ValueError, match="outside"):
        stack_context([np.zeros((2, 2))], 1, indices=[1])
    with pytest.raises(ValueError, match="no slices"):
        stack_context([], 1)


def test_spec_stores_and_validates_context_slices() -> None:
    spec = PreprocessSpec(height=8, width=8, context_slices=2)
    assert spec.channels == 5
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert PreprocessSpec.from_dict({"height": 8, "width": 8}).context_slices == 0
    for bad in (-1, 1.5, "2", True, 99):
        with pytest.raises(ConfigError, match="context_slices"):
            PreprocessSpec.from_dict({"height": 8, "width": 8, "context_slices": bad})


def test_mm_spacing_interpolates_between_slices_and_clamps_at_the_ends() -> None:
    z = [0.0, 2.0, 4.0, 6.0, 8.0]
    sources = channel_sources(z, 2, 2, spacing_mm=3.0)  # targets -2, 1, 4, 7, 10 mm
    assert sources == (((0, 1.0),), ((0, 0.5), (1, 0.5)), ((2, 1.0),),
                       ((3, 0.5), (4, 0.5)), ((4, 1.0),))
    slices = [np.full((2, 2), v, np.float32) for v in (0.0, 2.0, 4.0, 6.0, 8.0)]
    out = stack_context(slices, 2, indices=[2], distances=z, spacing_mm=3.0)
    np.testing.assert_allclose(out[0, :, 0, 0], [0.0, 1.0, 4.0, 7.0, 8.0])
    exact = stack_context(slices, 1, distances=z, spacing_mm=2.0)  # on the slices: no blend
    np.testing.assert_array_equal(exact, stack_context(slices, 1))


def test_spec_validates_context_spacing() -> None:
    spec = PreprocessSpec(height=8, width=8, context_slices=2, context_spacing_mm=4)
    assert spec.context_spacing_mm == 4.0
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    for bad in (0, -1.0, "4", True):
        with pytest.raises(ConfigError, match="context_spacing_mm"):
            PreprocessSpec.from_dict({"height": 8, "width": 8, "context_slices": 1,
                                      "context_spacing_mm": bad})
    with pytest.raises(ConfigError, match="context_spacing_mm"):
        PreprocessSpec(height=8, width=8, context_spacing_mm=4.0)  # without context_slices
