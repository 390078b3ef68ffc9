"""Detector evaluation: slice mAP (COCOeval) and per-scan FROC on held-out studies.

The model's heads are decoded exactly as serving decodes them
(:func:`edge.postprocess.detection.detect_slices`, with a low score floor so the precision-recall
and FROC curves are complete) and merged per study with
:func:`edge.postprocess.nodules3d.merge_slices`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge.postprocess.detection import DecodeSpec, detect_slices
from edge.postprocess.nodules3d import merge_slices
from edge.postprocess.results import NoduleCandidate, SliceDetection, VoxelSpacing
from edge.preprocess.imaging import PreprocessSpec
from trainer.detect import DetectionSet
from trainer.detection_metrics import ScanTruth, TruthNodule, coco_map, froc

EVAL_FLOOR = 0.05  # decode score floor while evaluating


@torch.no_grad()
def predict_heads(model: torch.nn.Module, images: np.ndarray, batch_size: int = 32
                  ) -> dict[str, np.ndarray]:
    """The three heads of ``images`` (N, 1, H, W), eval mode, as numpy."""
    was = model.training
    model.eval()
    outs: list[list[np.ndarray]] = [[], [], []]
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
        for k, t in enumerate(model(x)):
            outs[k].append(t.float().numpy())
    model.train(was)
    return {name: np.concatenate(o) for name, o in zip(("heatmap", "size", "offset"), outs,
                                                        strict=True)}


def study_geometry(manifest: Mapping[str, Any]) -> dict[str, tuple[VoxelSpacing, list]]:
    """Per study id: its voxel spacing and its nodules (from a synthetic ``manifest.json``)."""
    out = {}
    for s in manifest.get("studies", []):
        ct = s.get("ct") or {}
        row, col = (float(v) for v in ct.get("pixel_spacing", (1.0, 1.0)))
        thick = float(ct.get("slice_spacing", ct.get("slice_thickness", 1.0)))
        out[str(s["study_id"])] = (VoxelSpacing(row, col, thick), list(s.get("nodules", [])))
    return out


def decode_set(heads: Mapping[str, np.ndarray], data: DetectionSet, spec: PreprocessSpec,
               decode: DecodeSpec, floor: float = EVAL_FLOOR) -> list[SliceDetection]:
    """Slice detections (source frame), keyed by the COCO image id as ``sop_instance_uid``."""
    return list(detect_slices([str(i) for i in data.image_ids], heads, data.labels,
                              data.original_shapes, spec, {"default": floor}, decode))


def evaluate(heads: Mapping[str, np.ndarray], data: DetectionSet, coco_path: Path,
             spec: PreprocessSpec, decode: DecodeSpec, manifest: Mapping[str, Any] | None,
             threshold: float | None = None
             ) -> tuple[dict[str, float], list[ScanTruth], dict[str, list[NoduleCandidate]]]:
    """mAP (all boxes and >= 6 mm long side) and, with a manifest, FROC (all nodules and
    >= 6 mm). Returns the metrics and the candidates per study (for threshold choice).
    ``threshold`` set: also sensitivity and FPs per scan of candidates scoring >= it."""
    slices = decode_set(heads, data, spec, decode)
    gt = json.loads(Path(coco_path).read_text())
    ids = set(data.image_ids)
    gt = {"images": [i for i in gt["images"] if int(i["id"]) in ids],
          "annotations": [a for a in gt["annotations"] if int(a["image_id"]) in ids],
          "categories": gt["categories"]}
    geometry = study_geometry(manifest or {})
    spacing = {iid: (geometry[str(g)][0].column_mm if str(g) in geometry else 1.0)
               for iid, g in zip(data.image_ids, data.slices.groups, strict=True)}
    scores = coco_map(gt, {int(s.sop_instance_uid): s.boxes for s in slices},
                      pixel_spacing_mm=spacing)
    metrics = {"map_50": scores.map_50, "map_50_95": scores.map_50_95,
               "map_50_6mm": scores.map_50_min_size, "map_50_95_6mm": scores.map_50_95_min_size,
               "slices": float(len(slices))}
    candidates: dict[str, list[NoduleCandidate]] = {}
    truths: list[ScanTruth] = []
    if geometry:
        groups = np.asarray(data.slices.groups)
        for study in dict.fromkeys(str(g) for g in groups):
            if study not in geometry:
                continue
            vox, nodules = geometry[study]
            mine = [slices[i] for i in np.flatnonzero(groups == study)]
            candidates[study] = list(merge_slices(mine, vox))
            truths.append(ScanTruth(study, tuple(TruthNodule(tuple(n["center_voxel"]),
                                                             float(n["diameter_mm"]))
                                                 for n in nodules), vox))
    if truths:
        for suffix, minimum in (("", 0.0), ("_6mm", 6.0)):
            result = froc(truths, candidates, min_diameter_mm=minimum)
            metrics[f"froc_cpm{suffix}"] = result.cpm
            for rate, sens in zip(result.fp_rates, result.sensitivities, strict=True):
                if rate >= 1:
                    metrics[f"froc_sens_{int(rate)}fp{suffix}"] = sens
            metrics[f"nodules{suffix}"] = float(result.nodules)
        metrics["scans"] = float(len(truths))
        if threshold is not None:
            sens, fps = operating_point(truths, candidates, threshold)
            metrics.update(sensitivity_at_threshold=sens, fp_per_scan_at_threshold=fps)
    return metrics, truths, candidates


def operating_point(truths: Sequence[ScanTruth], candidates: Mapping[str, Sequence[
        NoduleCandidate]], threshold: float) -> tuple[float, float]:
    """(sensitivity, false positives per scan) of the candidates scoring >= ``threshold``."""
    kept = {k: [c for c in v if c.score >= threshold] for k, v in candidates.items()}
    result = froc(truths, kept)
    if not result.curve_sensitivity:
        return 0.0, 0.0
    return result.curve_sensitivity[-1], result.curve_fp_per_scan[-1]


def choose_threshold(truths: Sequence[ScanTruth], candidates: Mapping[str, Sequence[
        NoduleCandidate]], max_fp_per_scan: float = 1.0, default: float = 0.3) -> float:
    """The lowest score threshold (0.1 .. 0.9) at which the candidates make at most
    ``max_fp_per_scan`` false positives per scan (the most sensitive such point)."""
    if not truths:
        return default
    for t in np.round(np.arange(0.1, 0.91, 0.05), 2):
        if operating_point(truths, candidates, float(t))[1] <= max_fp_per_scan:
            return float(t)
    return 0.9
