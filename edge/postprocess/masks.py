"""Label maps, connected components and volumes (numpy/scipy only, pure functions).

Connectivity follows scipy's structuring elements: 1 = faces (6-connected in 3D), 2 = faces and
edges (18), 3 = faces, edges and corners (26).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from edge.postprocess.results import VoxelSpacing


def label_map_from_scores(scores: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Per-pixel label from class scores with the class axis first: ``(C, ...)`` -> ``(...)``.

    With C >= 2 the label is the argmax (softmax does not change it, so logits are fine). With
    C == 1 the channel is a foreground probability: label 1 where it is >= ``threshold``.

    Raises:
        ValueError: ``scores`` has no class axis, or more than 255 classes.
    """
    if scores.ndim < 2 or scores.shape[0] == 0:
        raise ValueError(f"label_map_from_scores: expected (C, ...), got {scores.shape}")
    if scores.shape[0] > 255:
        raise ValueError(f"label_map_from_scores: {scores.shape[0]} classes do not fit uint8")
    if scores.shape[0] == 1:
        return (scores[0] >= threshold).astype(np.uint8)
    return np.argmax(scores, axis=0).astype(np.uint8)


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    if not 1 <= connectivity <= ndim:
        raise ValueError(f"connectivity must be in 1..{ndim}, got {connectivity}")
    return ndimage.generate_binary_structure(ndim, connectivity)


def count_components(mask: np.ndarray, connectivity: int = 3) -> int:
    """Number of connected components of the non-zero voxels of ``mask``."""
    _, n = ndimage.label(mask != 0, structure=_structure(mask.ndim, connectivity))
    return int(n)


def remove_small_components(mask: np.ndarray, min_voxels: int,
                            connectivity: int = 3) -> np.ndarray:
    """A copy of the boolean ``mask`` without components of fewer than ``min_voxels`` voxels."""
    binary = mask != 0
    if min_voxels <= 1:
        return binary
    labelled, n = ndimage.label(binary, structure=_structure(mask.ndim, connectivity))
    if n == 0:
        return binary
    sizes = np.bincount(labelled.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labelled]


def clean_label_map(label_map: np.ndarray, n_labels: int, min_voxels: Mapping[int, int] | int,
                    connectivity: int = 3) -> np.ndarray:
    """Set components smaller than their label's ``min_voxels`` to background (0)."""
    out = label_map.copy()
    for label in range(1, n_labels):
        limit = min_voxels if isinstance(min_voxels, int) else min_voxels.get(label, 0)
        if limit > 1:
            mask = label_map == label
            out[mask & ~remove_small_components(mask, limit, connectivity)] = 0
    return out


def volumes_ml(label_map: np.ndarray, labels: Sequence[str],
               spacing: VoxelSpacing) -> dict[str, float]:
    """Volume of each foreground label in mL: voxel count x row x column x slice spacing / 1000."""
    # count_nonzero per label: np.bincount would first copy a uint8 volume to intp (8x the
    # memory; ~0.4 s for 100 slices of 512x512 against ~30 ms per label here)
    return {name: float(np.count_nonzero(label_map == i)) * spacing.voxel_ml
            for i, name in enumerate(labels) if i}


def component_counts(label_map: np.ndarray, labels: Sequence[str],
                     connectivity: int = 3) -> dict[str, int]:
    """Connected components of each foreground label (e.g. the nodule count)."""
    boxes = ndimage.find_objects(label_map, max_label=len(labels) - 1)  # one pass, then crops
    out = {}
    for i, name in enumerate(labels):
        if i:
            box = boxes[i - 1]
            out[name] = 0 if box is None else count_components(label_map[box] == i, connectivity)
    return out
