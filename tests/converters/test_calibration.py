"""Samples for calibration and the gate are what serving feeds the model: single-slice, and
stacked with neighbours for a 2.5D model, from a synthetic dataset and from a DICOM folder."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from converters.calibration import load_samples
from edge.preprocess.imaging import PreprocessSpec

SPEC = PreprocessSpec(height=32, width=32, window_center=-600, window_width=1500)
CONTEXT = replace(SPEC, context_slices=1)


@pytest.fixture()
def synth(small_synth: Path) -> Path:
    return small_synth


def test_dataset_samples_of_a_context_model_are_stacked_around_each_slice(synth: Path) -> None:
    plain = load_samples(synth, SPEC, labels=("no_nodule", "nodule"))
    stacked = load_samples(synth, CONTEXT, labels=("no_nodule", "nodule"))
    assert plain.images.shape[1] == 1 and stacked.images.shape[1] == 3
    assert len(stacked) == len(plain)
    np.testing.assert_array_equal(stacked.images[:, 1], plain.images[:, 0])
    assert not np.array_equal(stacked.images[:, 0], stacked.images[:, 1])  # real neighbours
    np.testing.assert_array_equal(stacked.labels, plain.labels)


def test_dicom_folder_samples_of_a_context_model_are_stacked_per_series(synth: Path) -> None:
    folder = synth / "study-0000" / "ct"
    plain = load_samples(folder, SPEC)
    stacked = load_samples(folder, CONTEXT)
    assert stacked.images.shape == (len(plain), 3, 32, 32)
    np.testing.assert_array_equal(stacked.images[:, 1], plain.images[:, 0])
    assert not np.array_equal(stacked.images[:, 0], stacked.images[:, 1])
