"""Model inputs for a whole series at once, with or without slice context.

For tools that hold every instance of a series (the demo, ``mededge infer`` on a file whose
series lies beside it): each single-frame instance preprocessed with the model's recipe and,
for a 2.5D model (``context_slices`` > 0), stacked with its neighbours exactly as the
streaming pipeline stacks them (:mod:`edge.preprocess.context`, volume order by
:func:`edge.preprocess.volume.slice_order`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from edge.core.errors import DataError
from edge.preprocess.context import stack_context
from edge.preprocess.dicom_pixels import decode
from edge.preprocess.imaging import PreprocessSpec, preprocess_image
from edge.preprocess.volume import frame_geometries, slice_order


def series_inputs(datasets: Sequence[Dataset], spec: PreprocessSpec) -> np.ndarray:
    """(N, C, H, W) float32 model inputs of ``datasets`` (single-frame instances of one
    series), in the order given; ``C`` is ``spec.channels``.

    Raises:
        DataError: no datasets, a multi-frame instance, or undecodable pixels.
    """
    if not datasets:
        raise DataError("series inputs: no instances")
    frames = []
    for ds in datasets:
        geometry = frame_geometries(ds)
        if len(geometry) != 1:
            raise DataError(f"{ds.SOPInstanceUID}: {len(geometry)} frames; single-frame only")
        frames.append(geometry[0])
    slices = []
    for ds in datasets:
        decoded = decode(ds, str(ds.SOPInstanceUID))
        slices.append(preprocess_image(decoded.frames[0], decoded.meta, spec))
    if not spec.context_slices:
        return np.stack(slices)
    order, _, distances = slice_order(frames)
    stacked = stack_context([slices[i] for i in order], spec.context_slices,
                            distances=distances or None, spacing_mm=spec.context_spacing_mm)
    out = np.empty_like(stacked)
    out[np.asarray(order)] = stacked
    return out
