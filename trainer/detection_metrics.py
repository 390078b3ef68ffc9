"""Detection metrics: COCO mAP per slice (pycocotools) and FROC / CPM per nodule (LUNA16).

mAP: our boxes (:class:`edge.postprocess.results.Box`, labels = COCO category names) against a
COCO ground truth such as ``labels/boxes_coco.json``, built in memory and scored by COCOeval
(101-point interpolated AP, ``maxDets`` 100, a match needs IoU >= the threshold), its prints
captured. ``map_50`` is AP at IoU 0.5, ``map_50_95`` the mean over 0.50:0.05:0.95. The size
bucket (``*_min_size``) keeps ground-truth boxes whose long side is at least ``min_size_mm``
(pixel spacing per image): COCOeval's area ranges do the filtering, with each box's "area" set to
its long side in mm squared, so that detections matched to smaller boxes, or unmatched and
smaller themselves, are ignored rather than counted as false positives.

FROC: candidates (:class:`NoduleCandidate`) against each scan's nodules. A candidate hits a
nodule when its centre lies within the nodule's radius (``diameter_mm / 2``, distance in mm:
the LUNA16 convention). Per nodule the best-scoring hit is the true positive; other hits are
ignored, as are hits on nodules below ``min_diameter_mm`` (not counted as missed either).
Candidates that hit nothing are false positives. Sensitivity at a rate is that of the best
operating point with at most that many false positives per scan (LUNA16's script interpolates
linearly between points instead; on a dense curve they agree). CPM is the mean over 1/8, 1/4,
1/2, 1, 2, 4 and 8. Undefined values (no ground truth) are NaN, as in ``trainer/metrics.py``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from edge.postprocess.results import Box, NoduleCandidate, SliceDetection, VoxelSpacing

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
_HUGE = 1e10


@dataclass(frozen=True)
class MapScores:
    """COCO average precisions over all ground truth and over boxes >= ``min_size_mm``."""

    map_50: float
    map_50_95: float
    map_50_min_size: float
    map_50_95_min_size: float
    min_size_mm: float


def detections_by_image(ground_truth: Mapping[str, Any],
                        slices: Sequence[SliceDetection]) -> dict[int, tuple[Box, ...]]:
    """Key slice detections by the COCO image whose ``sop_instance_uid`` they carry.

    Raises:
        ValueError: a slice's instance is not among the ground truth's images.
    """
    ids = {img.get("sop_instance_uid"): int(img["id"]) for img in ground_truth["images"]}
    missing = [s.sop_instance_uid for s in slices if s.sop_instance_uid not in ids]
    if missing:
        raise ValueError(f"detections_by_image: {len(missing)} instances not in the ground "
                         f"truth, e.g. {missing[0]}")
    return {ids[s.sop_instance_uid]: s.boxes for s in slices}


def _spacing(pixel_spacing_mm: float | Mapping[int, float], image_id: int) -> float:
    if isinstance(pixel_spacing_mm, Mapping):
        return float(pixel_spacing_mm[image_id])
    return float(pixel_spacing_mm)


def _average(precision: np.ndarray) -> float:
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else float("nan")


def coco_map(ground_truth: Mapping[str, Any], detections: Mapping[int, Sequence[Box]], *,
             pixel_spacing_mm: float | Mapping[int, float] = 1.0, min_size_mm: float = 6.0,
             max_dets: int = 100) -> MapScores:
    """COCOeval bbox mAP of ``detections`` (by image id) against a COCO ``ground_truth`` dict.

    Raises:
        ValueError: a detection on an unknown image or with a label that is no category.
        KeyError: an image id missing from a ``pixel_spacing_mm`` mapping.
    """
    categories = {c["name"]: int(c["id"]) for c in ground_truth["categories"]}
    images = {int(img["id"]) for img in ground_truth["images"]}
    annotations = []
    for i, ann in enumerate(ground_truth.get("annotations", ())):
        x, y, w, h = (float(v) for v in ann["bbox"])
        long_mm = max(w, h) * _spacing(pixel_spacing_mm, int(ann["image_id"]))
        annotations.append({**ann, "id": ann.get("id", i + 1), "iscrowd": ann.get("iscrowd", 0),
                            "bbox": [x, y, w, h], "area": long_mm ** 2})
    results = []
    for image_id, boxes in detections.items():
        if int(image_id) not in images:
            raise ValueError(f"coco_map: detections on image {image_id}, not in the ground truth")
        for b in boxes:
            if b.label not in categories:
                raise ValueError(f"coco_map: label {b.label!r} is not a category "
                                 f"({sorted(categories)})")
            results.append({"image_id": int(image_id), "category_id": categories[b.label],
                            "bbox": [b.x0, b.y0, b.width, b.height], "score": b.score})
    nan = float("nan")
    if not annotations:
        return MapScores(nan, nan, nan, nan, min_size_mm)
    if not results:
        return MapScores(0.0, 0.0, 0.0, 0.0, min_size_mm)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": list(ground_truth["images"]),
                      "categories": list(ground_truth["categories"]),
                      "annotations": annotations}
        gt.createIndex()
        dt = gt.loadRes(results)
        for ann in dt.dataset["annotations"]:
            w, h = ann["bbox"][2], ann["bbox"][3]
            ann["area"] = (max(w, h) * _spacing(pixel_spacing_mm, ann["image_id"])) ** 2
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.params.maxDets = [1, 10, max_dets]
        evaluator.params.areaRng = [[0.0, _HUGE], [min_size_mm ** 2, _HUGE]]
        evaluator.params.areaRngLbl = ["all", "min_size"]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"]  # [iou, recall, class, area, max_dets]
    at_50 = int(np.argmin(np.abs(evaluator.params.iouThrs - 0.5)))
    return MapScores(map_50=_average(precision[at_50, :, :, 0, -1]),
                     map_50_95=_average(precision[:, :, :, 0, -1]),
                     map_50_min_size=_average(precision[at_50, :, :, 1, -1]),
                     map_50_95_min_size=_average(precision[:, :, :, 1, -1]),
                     min_size_mm=min_size_mm)


@dataclass(frozen=True)
class TruthNodule:
    """A reference nodule: centre (slice, row, column) in voxel units, diameter in mm."""

    center_voxel: tuple[float, float, float]
    diameter_mm: float


@dataclass(frozen=True)
class ScanTruth:
    """One scan's reference nodules and voxel spacing."""

    scan_id: str
    nodules: tuple[TruthNodule, ...]
    spacing: VoxelSpacing


@dataclass(frozen=True)
class FrocResult:
    """Sensitivity at each false-positive rate, their mean (CPM) and the curve itself."""

    fp_rates: tuple[float, ...]
    sensitivities: tuple[float, ...]
    cpm: float
    curve_fp_per_scan: tuple[float, ...]  # one point per distinct score, by decreasing score
    curve_sensitivity: tuple[float, ...]
    nodules: int  # counted nodules (>= min_diameter_mm)
    scans: int


def _classify(truth: ScanTruth, candidates: Sequence[NoduleCandidate],
              min_diameter_mm: float) -> tuple[list[float], list[float]]:
    """(best score of each counted nodule that was hit, scores of the false positives)."""
    s = truth.spacing
    scale = np.array([s.slice_mm, s.row_mm, s.column_mm])
    centres = np.array([n.center_voxel for n in truth.nodules], np.float64).reshape(-1, 3)
    radius = np.array([n.diameter_mm / 2 for n in truth.nodules])
    counted = np.array([n.diameter_mm >= min_diameter_mm for n in truth.nodules], bool)
    best = np.full(len(truth.nodules), -np.inf)
    fps: list[float] = []
    for c in candidates:
        distance = np.linalg.norm((centres - np.asarray(c.center_voxel)) * scale, axis=1)
        hit = distance <= radius
        if not hit.any():
            fps.append(c.score)
        best[hit & counted] = np.maximum(best[hit & counted], c.score)
    return [float(v) for v in best[counted] if np.isfinite(v)], fps


def froc(truths: Sequence[ScanTruth], candidates: Mapping[str, Sequence[NoduleCandidate]], *,
         min_diameter_mm: float = 0.0, fp_rates: Sequence[float] = FP_RATES) -> FrocResult:
    """FROC of ``candidates`` (by scan id; scans without an entry have none) over ``truths``.

    Raises:
        ValueError: no scans, or candidates for a scan that is not in ``truths``.
    """
    if not truths:
        raise ValueError("froc: no scans")
    known = {t.scan_id for t in truths}
    extra = sorted(set(candidates) - known)
    if extra:
        raise ValueError(f"froc: candidates for unknown scan(s) {extra[:3]}")
    tps: list[float] = []
    fps: list[float] = []
    nodules = 0
    for truth in truths:
        hit, false = _classify(truth, candidates.get(truth.scan_id, ()), min_diameter_mm)
        tps += hit
        fps += false
        nodules += sum(n.diameter_mm >= min_diameter_mm for n in truth.nodules)
    rates = tuple(float(r) for r in fp_rates)
    if nodules == 0:
        nan = float("nan")
        return FrocResult(rates, tuple(nan for _ in rates), nan, (), (), 0, len(truths))
    tp_scores, fp_scores = np.sort(tps)[::-1], np.sort(fps)[::-1]
    thresholds = np.unique(np.concatenate([tp_scores, fp_scores]))[::-1]
    # counts of scores >= each threshold (scores sorted descending: searchsorted on negatives)
    sens = np.searchsorted(-tp_scores, -thresholds, side="right") / nodules
    fppi = np.searchsorted(-fp_scores, -thresholds, side="right") / len(truths)
    curve_s, curve_f = np.concatenate([[0.0], sens]), np.concatenate([[0.0], fppi])
    at = tuple(float(curve_s[curve_f <= r].max()) for r in rates)
    return FrocResult(rates, at, float(np.mean(at)), tuple(float(v) for v in fppi),
                      tuple(float(v) for v in sens), nodules, len(truths))
