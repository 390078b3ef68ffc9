"""A whole series' model inputs, in the order given, stacked as the pipeline stacks them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom

from edge.cli import main as cli
from edge.preprocess.context import stack_context
from edge.preprocess.dicom_pixels import decode
from edge.preprocess.imaging import PreprocessSpec, preprocess_image
from edge.preprocess.series_input import series_inputs
from edge.preprocess.volume import frame_geometries, slice_order


def test_series_inputs_follow_the_volume_not_the_list(tmp_path: Path) -> None:
    assert cli(["synth", "--out", str(tmp_path), "--studies", "1", "--seed", "4", "--size", "48",
                "--slices-min", "6", "--slices-max", "6", "--quiet"]) == 0
    ct = json.loads((tmp_path / "manifest.json").read_text())["studies"][0]["ct"]
    datasets = [pydicom.dcmread(tmp_path / ct["dir"] / f) for f in ct["files"]]
    shuffled = [datasets[i] for i in (3, 0, 5, 1, 4, 2)]
    spec = PreprocessSpec(height=32, width=32, window_center=-600, window_width=1500,
                          context_slices=2, context_spacing_mm=1.7)
    got = series_inputs(shuffled, spec)
    assert got.shape == (6, 5, 32, 32)
    order, _, distances = slice_order([frame_geometries(ds)[0] for ds in shuffled])
    planes = [preprocess_image(decode(shuffled[i]).frames[0], decode(shuffled[i]).meta, spec)
              for i in order]
    want = stack_context(planes, 2, distances=distances, spacing_mm=1.7)
    for row, i in enumerate(order):
        np.testing.assert_array_equal(got[i], want[row])
    single = series_inputs(shuffled, spec.single_slice())
    assert single.shape == (6, 1, 32, 32)
    np.testing.assert_array_equal(single[:, 0], got[:, 2])  # the centre channel
