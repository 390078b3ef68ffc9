"""Finalize's CAM step: a positive classification's SR is followed by a heatmap object of its
most suspicious slice, made by a real classifier with a ``cam`` output served through the
scheduler (ONNX Runtime); ``none`` writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from model_factory import served

from edge.cli import main as cli
from edge.core.types import ModelId, Task
from edge.pipeline.cam_results import cam_results
from edge.pipeline.series_results import ModelRun, ResultFile
from edge.postprocess.results import SeriesClassification, SliceClassification
from edge.preprocess.imaging import PreprocessSpec
from edge.repository.sidecar import Sidecar
from edge.writers.cam import CamOutput
from trainer.cam import OUTPUT_NAMES, ClassifierWithCam
from trainer.export_heads import publish_multi
from trainer.models import ModelSpec, build_model

SPEC = PreprocessSpec(height=64, width=64, window_center=-600, window_width=1500)
LABELS = ("no_nodule", "nodule")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("cam")
    assert cli(["synth", "--out", str(root / "data"), "--studies", "1", "--seed", "2", "--size",
                "64", "--slices-min", "3", "--slices-max", "3", "--quiet"]) == 0
    ct = json.loads((root / "data" / "manifest.json").read_text())["studies"][0]["ct"]
    files = [root / "data" / ct["dir"] / f for f in ct["files"]]
    torch.manual_seed(0)
    model = ClassifierWithCam(build_model(ModelSpec("classify", 2, widths=(8, 16))).eval())
    sidecar = Sidecar(task=Task.CLASSIFY, labels=LABELS, preprocess=SPEC,
                      thresholds={"nodule": 0.5},
                      postprocess={"activation": "softmax", "output": "logits", "cam": "cam"})
    samples = np.random.default_rng(0).normal(size=(2, 1, 64, 64)).astype(np.float32)
    publish_multi(model, samples, root / "repo", "cls", sidecar, OUTPUT_NAMES, metrics={},
                  report={}, work_dir=root / "work")
    return root, files


def _sr(files: list[Path], model: ModelId, positive: bool) -> ResultFile:
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    slices = tuple(SliceClassification(u, (0.9 - p, 0.1 + p)) for u, p in zip(
        uids, (0.1, 0.8, 0.3), strict=True))
    cls = SeriesClassification(model, LABELS, slices, 0.9 if positive else 0.2, positive, 0.5)
    return ResultFile("sr", model, Path("sr.dcm"), "1.2.3", cls.probability, positive,
                      classification=cls)


@pytest.mark.parametrize("output", [CamOutput.SC, CamOutput.PM])
def test_positive_series_gets_a_heatmap_of_its_top_slice(setup: tuple[Path, list[Path]],
                                                         tmp_path: Path, output: CamOutput
                                                         ) -> None:
    root, files = setup
    model = served(root / "repo", "cls")
    try:
        assert model.sidecar is not None
        run = ModelRun(model.id, model.sidecar)
        paths = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f
                 for f in files}
        errors: list[Exception] = []
        out = list(cam_results(iter([_sr(files, model.id, True), _sr(files, model.id, False)]),
                               tmp_path, {model.id.name: run}, lambda r: model, paths, output,
                               1, 30.0, lambda r, e: errors.append(e)))
    finally:
        model.close()
    assert errors == []
    assert [r.kind for r in out] == ["sr", output.value, "sr"]  # none after the negative SR
    ds = pydicom.dcmread(out[1].path)
    top = pydicom.dcmread(files[1], stop_before_pixels=True)  # probability 0.9: the top slice
    assert ds.StudyInstanceUID == top.StudyInstanceUID and (ds.Rows, ds.Columns) == (64, 64)
    if output is CamOutput.SC:
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == top.SOPInstanceUID
    else:
        assert float(ds.pixel_array.min()) >= 0.0 and float(ds.pixel_array.max()) <= 1.0


def test_none_writes_nothing(setup: tuple[Path, list[Path]], tmp_path: Path) -> None:
    _, files = setup
    model_id = ModelId("cls", 1)
    sidecar = Sidecar(task=Task.CLASSIFY, labels=LABELS, preprocess=SPEC,
                      postprocess={"cam": "cam"})

    def no_model(run: ModelRun) -> None:
        raise AssertionError("no inference for cam_output none")
    out = list(cam_results(iter([_sr(files, model_id, True)]), tmp_path,
                           {"cls": ModelRun(model_id, sidecar)}, no_model,  # type: ignore[arg-type]
                           {}, CamOutput.NONE, 1, 30.0, lambda r, e: None))
    assert [r.kind for r in out] == ["sr"]
