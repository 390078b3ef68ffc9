"""The shared preprocessing: modality LUT, MONOCHROME1, windows, resize and its inverse."""

import numpy as np
import pytest

from edge.core.errors import ConfigError
from edge.preprocess.imaging import (
    PixelMeta,
    PreprocessSpec,
    ResizeMode,
    apply_window,
    preprocess_image,
    restore_geometry,
    to_modality_units,
)


def test_modality_lut_gives_hounsfield_units() -> None:
    stored = np.array([[0, 1024, 2024]], dtype=np.uint16)
    hu = to_modality_units(stored, PixelMeta(rescale_slope=1.0, rescale_intercept=-1024.0))
    np.testing.assert_array_equal(hu, [[-1024.0, 0.0, 1000.0]])


def test_window_maps_to_unit_range_and_clips() -> None:
    values = np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0], dtype=np.float32)
    out = apply_window(values, center=-600.0, width=1500.0)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_monochrome1_is_inverted() -> None:
    stored = np.array([[0, 100], [200, 300]], dtype=np.uint16)
    spec = PreprocessSpec(height=2, width=2)
    mono2 = preprocess_image(stored, PixelMeta(), spec)
    mono1 = preprocess_image(stored, PixelMeta(photometric_interpretation="MONOCHROME1"), spec)
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_output_shape_and_normalisation() -> None:
    stored = np.full((64, 32), 1024, dtype=np.uint16)
    spec = PreprocessSpec(height=16, width=16, window_center=0.0, window_width=100.0,
                          mean=0.5, std=0.25)
    out = preprocess_image(stored, PixelMeta(rescale_intercept=-1024.0), spec)
    assert out.shape == (1, 16, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.0, atol=1e-6)  # HU 0 is mid-window -> 0.5 -> (0.5-0.5)/.25


@pytest.mark.parametrize("mode", [ResizeMode.RESIZE, ResizeMode.LETTERBOX])
def test_restore_geometry_round_trips_a_mask(mode: ResizeMode) -> None:
    mask = np.zeros((120, 80), dtype=np.uint8)
    mask[30:90, 20:60] = 1
    spec = PreprocessSpec(height=64, width=64, resize=mode)
    small = preprocess_image(mask.astype(np.uint16), PixelMeta(), spec)[0] > 0.5
    back = restore_geometry(small.astype(np.uint8), mask.shape, spec)
    assert back.shape == mask.shape
    agreement = (back == mask).mean()
    assert agreement > 0.97, agreement


def test_spec_round_trips_and_rejects_bad_values() -> None:
    spec = PreprocessSpec(height=8, width=8, window_center=40, window_width=400,
                          resize="letterbox")
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="unknown"):
        PreprocessSpec.from_dict({"height": 8, "width": 8, "colour": 1})
    with pytest.raises(ConfigError, match="go together"):
        PreprocessSpec(height=8, width=8, window_center=1.0)
    with pytest.raises(ConfigError, match="window_width"):
        PreprocessSpec(height=8, width=8, window_center=1.0, window_width=0.0)
