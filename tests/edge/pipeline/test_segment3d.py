"""A 3D segmenter (sidecar ``postprocess.dims: 3``) at finalize: the slices the workers kept
preprocessed are stacked and segmented with a 3D sliding window through the scheduler (a real
MONAI 3D U-Net on ONNX Runtime), then written as a SEG in the source geometry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import torch
from model_factory import served

from edge.cli import main as cli
from edge.core.types import Task
from edge.pipeline.series_results import ModelRun, SourceInstance, iter_pipeline_results
from edge.pipeline.slices import SliceStore
from edge.preprocess.dicom_pixels import decode
from edge.preprocess.imaging import PreprocessSpec, preprocess_image
from edge.preprocess.volume import frame_geometries
from edge.repository.sidecar import Sidecar
from edge.routing.rules import Pipeline
from trainer.export_heads import publish_multi
from trainer.train3d import LABELS, build_unet3d

SPEC = PreprocessSpec(height=32, width=32, window_center=-600, window_width=1500)
PATCH = [8, 32, 32]


def test_3d_segmenter_runs_through_the_scheduler(tmp_path: Path) -> None:
    assert cli(["synth", "--out", str(tmp_path / "data"), "--studies", "1", "--seed", "3",
                "--size", "64", "--slices-min", "8", "--slices-max", "8", "--quiet"]) == 0
    ct = json.loads((tmp_path / "data" / "manifest.json").read_text())["studies"][0]["ct"]
    datasets = [pydicom.dcmread(tmp_path / "data" / ct["dir"] / f) for f in ct["files"]]
    torch.manual_seed(0)
    sidecar = Sidecar(task=Task.SEGMENT, labels=LABELS, preprocess=SPEC,
                      postprocess={"activation": "softmax", "argmax": True, "output": "logits",
                                   "dims": 3, "patch": PATCH, "overlap": 0.25})
    x = np.random.default_rng(0).normal(size=(2, 1, *PATCH)).astype(np.float32)
    publish_multi(build_unet3d((4, 8)).eval(), x, tmp_path / "repo", "lung3d", sidecar,
                  ("logits",), metrics={}, report={}, work_dir=tmp_path / "work")
    model = served(tmp_path / "repo", "lung3d")
    try:
        assert model.sidecar is not None
        run = ModelRun(model.id, model.sidecar)
        store = SliceStore(tmp_path / "results")
        series = str(datasets[0].SeriesInstanceUID)
        for ds in reversed(datasets):  # arrival order does not matter
            d = decode(ds, str(ds.SOPInstanceUID))
            value = preprocess_image(d.frames[0], d.meta, SPEC)[0].astype(np.float16)
            store.save(series, model.id, str(ds.SOPInstanceUID), 1, value)
        sources = [SourceInstance(str(ds.SOPInstanceUID), ds, frame_geometries(ds))
                   for ds in datasets]
        errors: list[Exception] = []
        files = list(iter_pipeline_results(
            tmp_path / "out", store, series, Pipeline("chest3d", ("lung3d",)), [run], sources,
            lambda r, e: errors.append(e), served_for=lambda r: model))
    finally:
        model.close()
    assert errors == []
    kinds = [f.kind for f in files]
    assert kinds == ["seg", "sr"]
    seg = pydicom.dcmread(files[0].path)
    assert (seg.Rows, seg.Columns) == (64, 64)
    assert seg.SegmentSequence[0].SegmentLabel == "lung"
