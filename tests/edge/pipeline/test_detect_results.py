"""A detector through the pipeline's series path: each frame's heads decoded as the streaming
worker does (``decode_frame``), kept in the SliceStore, merged in 3D at finalize and reported in
a TID 1500 SR with one group per nodule; the event carries the nodules."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from edge.cli import main as cli
from edge.core.types import ModelId, Task
from edge.pipeline.events import nodule_findings
from edge.pipeline.series_results import ModelRun, SourceInstance, iter_pipeline_results
from edge.pipeline.slices import SliceStore
from edge.postprocess.detection import DecodeSpec, to_model_frame
from edge.postprocess.slice_boxes import decode_frame
from edge.preprocess.imaging import PreprocessSpec
from edge.preprocess.volume import frame_geometries
from edge.repository.sidecar import Sidecar
from edge.routing.rules import Pipeline
from trainer.detect import draw_targets

MODEL = ModelId("noddet", 3)
SPEC = PreprocessSpec(height=64, width=64, window_center=-600, window_width=1500)
SIDECAR = Sidecar(task=Task.DETECT, labels=("nodule",), preprocess=SPEC,
                  thresholds={"nodule": 0.5},
                  postprocess={"stride": 4, "size_encoding": "log", "heatmap_logits": True,
                               "outputs": ["heatmap", "size", "offset"],
                               "merge": {"min_iou": 0.3, "max_gap": 1}})


def test_detector_series_gives_an_sr_with_its_nodules(tmp_path: Path) -> None:
    out = tmp_path / "data"
    assert cli(["synth", "--out", str(out), "--studies", "3", "--seed", "4", "--size", "128",
                "--slices-min", "12", "--slices-max", "14", "--quiet"]) == 0
    study = next(s for s in json.loads((out / "manifest.json").read_text())["studies"]
                 if any(n["diameter_mm"] >= 8 for n in s["nodules"]))
    ct = study["ct"]
    headers = [pydicom.dcmread(out / ct["dir"] / f, stop_before_pixels=True) for f in ct["files"]]
    series = str(headers[0].SeriesInstanceUID)
    store = SliceStore(tmp_path / "results")
    for i, header in enumerate(headers):  # perfect heads from the ground-truth boxes
        boxes = [[x, y, x + w, y + h] for n in study["nodules"]
                 for k, (x, y, w, h) in n["boxes"].items() if int(k) == i]
        model_boxes = to_model_frame(np.array(boxes).reshape(-1, 4), (128, 128), SPEC)
        t = draw_targets([model_boxes.astype(np.float32)], 64, 64, DecodeSpec())
        heads = {"heatmap": np.where(t["heatmap"] == 1, 4.0, -6.0).astype(np.float32),
                 "size": t["size"], "offset": t["offset"]}
        rows = decode_frame(heads, SIDECAR.labels, (128, 128), SPEC, SIDECAR.thresholds,
                            SIDECAR.postprocess)
        assert rows.shape == (len(boxes), 6)
        store.save(series, MODEL, str(header.SOPInstanceUID), 1, rows)
    sources = [SourceInstance(str(h.SOPInstanceUID), h, frame_geometries(h)) for h in headers]
    errors: list[Exception] = []
    files = list(iter_pipeline_results(tmp_path / "out", store, series,
                                       Pipeline("chest", ("noddet",)), [ModelRun(MODEL, SIDECAR)],
                                       sources, lambda run, exc: errors.append(exc)))
    assert errors == []
    (sr,) = files
    assert sr.kind == "sr" and sr.detection is not None
    groups = hd.sr.srread(sr.path).content.get_planar_roi_measurement_groups()
    assert len(groups) == len(sr.detection.candidates) >= 1
    findings = nodule_findings(sr.detection)
    big = max(study["nodules"], key=lambda n: n["diameter_mm"])
    best = min(findings, key=lambda f: np.hypot(f.center_voxel[1] - big["center_voxel"][1],
                                                f.center_voxel[2] - big["center_voxel"][2]))
    assert best.center_voxel == pytest.approx(big["center_voxel"], abs=1.5)
    assert best.center_mm is not None and best.diameter_mm > 0
