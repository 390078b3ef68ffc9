"""The in-memory training set: preprocessed slices, labels, masks, splits, and a load summary."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, replace

import numpy as np

from edge.preprocess.context import stack_context
from edge.preprocess.volume import FrameGeometry, slice_order

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CLASSIFY_LABELS = ("no_nodule", "nodule")
SEGMENT_LABELS = ("background", "lung", "nodule")


@dataclass(frozen=True)
class SkippedFile:
    """A file that could not be used, and why (the reason never carries patient data)."""

    path: str
    reason: str


@dataclass(frozen=True)
class LoadSummary:
    """How many slices were loaded and which files were skipped."""

    loaded: int
    skipped: tuple[SkippedFile, ...] = ()

    def log(self, source: str) -> None:
        """Log one line per skipped file and a summary line."""
        for item in self.skipped:
            log.warning("skipped %s: %s", item.path, item.reason)
        log.info("%s: %d slices loaded, %d files skipped", source, self.loaded, len(self.skipped))

    def as_dict(self) -> dict[str, object]:
        return {"loaded": self.loaded, "skipped": len(self.skipped),
                "skipped_files": [{"path": s.path, "reason": s.reason} for s in self.skipped]}


@dataclass(frozen=True)
class SliceSet:
    """Preprocessed 2D slices ready for a model.

    ``images`` (N, 1, H, W) float32 in model-input units (float16 where :meth:`with_context` was
    asked to store them so: consumers cast batches to float32); ``labels`` (N,) int64 slice
    class (-1 unknown); ``masks`` (N, H, W) uint8 class-index maps or None; ``groups`` the study
    (or series) each slice belongs to; ``splits`` one of :data:`SPLITS` per slice; ``sources``
    the file each slice came from, relative to the data folder. ``nodule_mm`` (N,) float32,
    where the data has nodule masks: the equivalent-circle diameter in mm of the largest nodule
    cross-section on the slice, measured on the stored (unresized) mask with the pixel spacing
    (0 where no nodule touches the slice, NaN where unknown); None when no masks at all.
    ``geometry`` (N, 9) float64: ImagePositionPatient (3) and ImageOrientationPatient (6) of
    each slice's frame, NaN where the header has none; None when not recorded. It puts a
    group's slices in volume order for 2.5D inputs (:meth:`with_context`).
    ``context_slices``: 0 for single-slice ``images``; k when :meth:`with_context` stacked
    each slice with k neighbours on each side (``images`` then has 2k + 1 channels).
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    groups: np.ndarray
    splits: np.ndarray
    sources: np.ndarray
    fingerprint: str
    summary: LoadSummary = field(default_factory=lambda: LoadSummary(0))
    nodule_mm: np.ndarray | None = None
    geometry: np.ndarray | None = None
    context_slices: int = 0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, split: str) -> SliceSet:
        """The slices of one split (``train``, ``val`` or ``test``)."""
        return self.select(self.splits == split)

    def select(self, keep: np.ndarray) -> SliceSet:
        """The slices where the boolean vector ``keep`` is set (every per-slice array), or
        those an integer index array names, in its order. Where the set slices form one
        contiguous run the arrays are views of this set's, not copies (see
        :meth:`grouped_by_split`)."""
        run = _contiguous_run(keep)
        sel = keep if run is None else run
        return replace(
            self, images=self.images[sel], labels=self.labels[sel],
            masks=None if self.masks is None else self.masks[sel], groups=self.groups[sel],
            splits=self.splits[sel], sources=self.sources[sel],
            nodule_mm=None if self.nodule_mm is None else self.nodule_mm[sel],
            geometry=None if self.geometry is None else self.geometry[sel])

    def grouped_by_split(self) -> SliceSet:
        """The same slices reordered so that each split is one contiguous run (train, val,
        test, then any other; the order within a split kept), so that :meth:`subset` returns
        views instead of copies: the training, validation and test sets then share the
        memory of the whole set. Each split's slices come out in the order ``subset`` gave
        before, so training draws the same slices either way."""
        rank = {s: i for i, s in enumerate(SPLITS)}
        key = np.array([rank.get(str(s), len(SPLITS)) for s in self.splits], np.int64)
        order = np.argsort(key, kind="stable")
        if np.array_equal(order, np.arange(len(order))):
            return self
        return self.select(order)

    def volume_order(self) -> list[tuple[np.ndarray, list[float]]]:
        """Per group (in order of first appearance): the indices of its slices in volume
        order (:func:`edge.preprocess.volume.slice_order` on the recorded geometry, the
        runtime's order) and their distances along the normal in mm; where a group lacks
        positions, the loaded order with the slices taken as 1 mm apart."""
        seen: dict[object, list[int]] = {}
        for i, g in enumerate(self.groups):
            seen.setdefault(g, []).append(i)
        out = []
        for rows in seen.values():
            order, distances = self._group_order(rows)
            out.append((np.asarray([rows[j] for j in order], np.int64), distances))
        return out

    def _group_order(self, rows: list[int]) -> tuple[list[int], list[float]]:
        if self.geometry is None or not np.isfinite(self.geometry[rows]).all():
            return list(range(len(rows))), [float(i) for i in range(len(rows))]
        frames = []
        for n, i in enumerate(rows):
            x, y, z = (float(v) for v in self.geometry[i, :3])
            frames.append(FrameGeometry(
                sop_instance_uid=str(self.sources[i]), instance_number=n, position=(x, y, z),
                orientation=tuple(float(v) for v in self.geometry[i, 3:])))
        order, _, distances = slice_order(frames)
        return order, distances

    def with_context(self, k: int, spacing_mm: float | None = None,
                     dtype: np.dtype | type = np.float32) -> SliceSet:
        """The same slices as 2.5D inputs: each slice's image stacked with its ``k``
        neighbours on each side within its group, in volume order, edge slices replicated;
        with ``spacing_mm``, the group's volume at multiples of that distance along the normal
        (:func:`edge.preprocess.context.stack_context`, as serving stacks them). ``images``
        becomes (N, 2k + 1, H, W) of ``dtype`` (float16 halves the memory of the 2k + 1
        copies of every slice: the classifier and the detector store theirs so, and cast each
        batch to float32); labels and masks stay those of the centre slice. Call it on the
        whole loaded set, before slices are dropped, so neighbours are the real ones.

        Raises:
            ValueError: ``k`` < 0, or the set is already stacked.
        """
        if k < 0 or self.context_slices:
            raise ValueError(f"with_context({k}) on a set with context {self.context_slices}")
        if k == 0 or len(self) == 0:
            return self
        images = np.empty((len(self), 2 * k + 1, *self.images.shape[2:]), dtype)
        for rows, distances in self.volume_order():  # computed in float32, then stored
            images[rows] = stack_context(self.images[rows], k, distances=distances,
                                         spacing_mm=spacing_mm)
        return replace(self, images=images, context_slices=k)

    def has_masks(self) -> bool:
        return self.masks is not None

    def has_labels(self) -> bool:
        return bool(len(self)) and bool(np.all(self.labels >= 0))


IGNORED_LABEL = -1


def _contiguous_run(keep: np.ndarray) -> slice | None:
    """``keep`` (a boolean vector) as a slice when its set entries form one contiguous run;
    None otherwise (or for an index array)."""
    keep = np.asarray(keep)
    if keep.dtype != bool or keep.ndim != 1:
        return None
    idx = np.flatnonzero(keep)
    if len(idx) == 0 or int(idx[-1]) - int(idx[0]) + 1 != len(idx):
        return None
    return slice(int(idx[0]), int(idx[-1]) + 1)


def visible_nodule_labels(labels: np.ndarray, nodule_mm: np.ndarray | None,
                          min_mm: float) -> np.ndarray:
    """Slice labels under the "visible nodule" rule (docs/training.md).

    1 where a nodule cross-section of at least ``min_mm`` (equivalent-circle diameter) lies on
    the slice, 0 where no nodule touches it (``labels`` 0), :data:`IGNORED_LABEL` where only a
    smaller cap touches it. Where ``nodule_mm`` is unknown (None or NaN) ``labels`` stands.
    """
    out = np.asarray(labels, np.int64).copy()
    if nodule_mm is None or min_mm <= 0:
        return out
    mm = np.asarray(nodule_mm, np.float64)
    known = np.isfinite(mm)
    out[known & (mm >= min_mm)] = 1
    out[known & (mm > 0) & (mm < min_mm)] = IGNORED_LABEL
    return out


def split_for(group: str, val_fraction: float = 0.15, test_fraction: float = 0.15) -> str:
    """A deterministic split for a study/series id (by hash), when the data names none."""
    h = int(hashlib.sha256(group.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if h < test_fraction:
        return "test"
    if h < test_fraction + val_fraction:
        return "val"
    return "train"


def empty_set(height: int, width: int, fingerprint: str, summary: LoadSummary,
              with_masks: bool) -> SliceSet:
    """A SliceSet with no slices (every file was skipped)."""
    return SliceSet(
        images=np.zeros((0, 1, height, width), np.float32), labels=np.zeros(0, np.int64),
        masks=np.zeros((0, height, width), np.uint8) if with_masks else None,
        groups=np.zeros(0, dtype=object), splits=np.zeros(0, dtype=object),
        sources=np.zeros(0, dtype=object), fingerprint=fingerprint, summary=summary)
