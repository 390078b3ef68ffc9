"""Per-slice model outputs, kept on disk so a restart never recomputes what was computed.

One small ``.npy`` file per (series, model version, SOP Instance, frame) under
``<results>/<series>/slices/<model>-v<version>/``: a classifier's scores (C,) float32 or a
segmenter's label map at model size (H, W) uint8. Files are written to a temporary name and
renamed, without fsync: a file lost or torn by a power cut only means that slice is inferred
again (inference is deterministic), never a wrong result.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from edge.core.types import ModelId, Task
from edge.postprocess.masks import label_map_from_scores

LOG = logging.getLogger(__name__)


def slice_output(task: Task, output: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """What is kept of one frame's model output (batch axis removed).

    Raises:
        ValueError: a segmentation output is not (C, H, W), or the task is not supported.
    """
    if task is Task.CLASSIFY:
        return np.asarray(output, dtype=np.float32).reshape(-1)
    if task is Task.SEGMENT:
        scores = np.asarray(output)
        if scores.ndim != 3:
            raise ValueError(f"segmentation output must be (C, H, W), got {scores.shape}")
        return label_map_from_scores(scores, threshold)
    raise ValueError(f"task {task.value} is not run on DICOM series yet")


class SliceStore:
    """The per-slice output files of one results folder."""

    def __init__(self, results_dir: Path) -> None:
        self.root = Path(results_dir)

    def path(self, series_instance_uid: str, model: ModelId, sop_instance_uid: str,
             frame: int = 1) -> Path:
        return (self.root / series_instance_uid / "slices" / f"{model.name}-v{model.version}"
                / f"{sop_instance_uid}-{frame}.npy")

    def input_path(self, series_instance_uid: str, model: ModelId, sop_instance_uid: str,
                   frame: int = 1) -> Path:
        """Where a 2.5D model's preprocessed slice (H, W) float32 is kept (its neighbours'
        inputs are stacked from these; see :mod:`edge.pipeline.context`)."""
        return (self.root / series_instance_uid / "slices"
                / f"{model.name}-v{model.version}-inputs" / f"{sop_instance_uid}-{frame}.npy")

    def has(self, series_instance_uid: str, model: ModelId, sop_instance_uid: str,
            frames: int = 1) -> bool:
        return all(self.path(series_instance_uid, model, sop_instance_uid, f).is_file()
                   for f in range(1, frames + 1))

    def save(self, series_instance_uid: str, model: ModelId, sop_instance_uid: str,
             frame: int, value: np.ndarray, *, kind: str = "output") -> None:
        """Keep a frame's output (``kind`` "output") or a 2.5D model's preprocessed slice
        ("input").

        Raises: OSError (disk full, permissions).
        """
        path = (self.input_path if kind == "input" else self.path)(
            series_instance_uid, model, sop_instance_uid, frame)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, value, allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self, series_instance_uid: str, model: ModelId, sop_instance_uid: str,
             frame: int = 1, *, kind: str = "output") -> np.ndarray | None:
        """The stored output (or ``kind`` "input": preprocessed slice), or None when missing or
        unreadable (then it is inferred again)."""
        path = (self.input_path if kind == "input" else self.path)(
            series_instance_uid, model, sop_instance_uid, frame)
        try:
            return np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            LOG.warning("slice output %s unreadable (%s); it will be inferred again", path, exc)
            path.unlink(missing_ok=True)
            return None
