"""Heatmaps of positive classifications, written at finalize (``pipeline.cam_output``).

For a classifier whose sidecar names a ``cam`` output (``postprocess.cam``) and whose series
verdict is positive, the ``pipeline.cam_slices`` most suspicious slices are inferred once more
(the per-slice store keeps only the scores: a CAM per slice would be 64 KiB or more, for every
slice of every series, to be used on a few) and their CAM goes out as a Secondary Capture
overlay (``sc``, default) or a Parametric Map (``pm``); ``none`` writes nothing. The extra
inferences go through the scheduler like any other request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pydicom

from edge.core.errors import DataError, MededgeError
from edge.core.types import InferenceRequest
from edge.pipeline.series_results import ModelRun, ResultFile, write_dataset
from edge.preprocess.dicom_pixels import decode
from edge.preprocess.imaging import preprocess_image
from edge.scheduler.model import ServedModel
from edge.writers.cam import CamOutput, build_cam_pm, build_cam_sc
from edge.writers.codes import AlgorithmInfo

LOG = logging.getLogger(__name__)


def top_slices(result: ResultFile, count: int) -> list[str]:
    """SOP Instance UIDs of the ``count`` slices with the highest positive probability."""
    cls = result.classification
    if cls is None or count <= 0:
        return []
    k = cls.labels.index(cls.positive_label)
    ranked = sorted(cls.slices, key=lambda s: -s.probabilities[k])
    return [s.sop_instance_uid for s in ranked[:count]]


def slice_cam(served: ServedModel, dataset: pydicom.Dataset, deadline_s: float,
              inputs: np.ndarray | None = None) -> np.ndarray:
    """The CAM (H, W) of the first frame of ``dataset`` at the model's input size; ``inputs``
    the model input (1, C, H, W) when it is not the frame alone (a 2.5D model: the slice
    stacked with its neighbours).

    Raises:
        DataError: undecodable pixels. MededgeError: scheduler or backend failure.
        KeyError: the model has no CAM output.
    """
    sidecar = served.sidecar
    assert sidecar is not None
    name = str(sidecar.postprocess["cam"])
    if inputs is None:
        if sidecar.preprocess.context_slices:
            raise ValueError(f"{served.id}: a 2.5D model's CAM needs the slice's stacked input")
        decoded = decode(dataset, str(dataset.SOPInstanceUID))
        x = preprocess_image(decoded.frames[0], decoded.meta, sidecar.preprocess)[np.newaxis]
    else:
        x = inputs
    spec = served.inputs[0]
    response = served.submit(InferenceRequest(
        model=served.id.name, version=served.id.version,
        inputs={spec.name: x.astype(spec.dtype)}, request_id=str(dataset.SOPInstanceUID),
        deadline=time.monotonic() + deadline_s)).result()
    return np.asarray(response.outputs[name])[0, 0]


def cam_results(results: Iterator[ResultFile], folder: Path, runs: Mapping[str, ModelRun],
                served_for: Callable[[ModelRun], ServedModel], paths: Mapping[str, Path],
                output: CamOutput, count: int, deadline_s: float,
                on_error: Callable[[ModelRun, Exception], None],
                inputs_for: Callable[[ModelRun, str], np.ndarray | None] | None = None,
                ) -> Iterator[ResultFile]:
    """``results`` as they come, each positive classification's SR followed by its CAM
    objects. ``runs`` by model name; ``paths`` the spooled file of each instance;
    ``inputs_for`` a slice's stacked input for 2.5D models (None: the frame alone).

    Raises:
        OSError: a result file cannot be written.
    """
    for result in results:
        yield result
        # The classifier's run: an SR that also reports a segmentation belongs to the
        # segmenter (result.model), the verdict and its heatmap to the classifier.
        classifier = result.classification.model if result.classification else result.model
        run = runs.get(classifier.name)
        if (output is CamOutput.NONE or result.kind != "sr" or not result.positive
                or run is None or "cam" not in run.sidecar.postprocess):
            continue
        algorithm = AlgorithmInfo(run.model.name, str(run.model.version))
        for index, uid in enumerate(top_slices(result, count)):
            try:
                dataset = pydicom.dcmread(paths[uid])
                stacked = inputs_for(run, uid) if inputs_for is not None else None
                cam = slice_cam(served_for(run), dataset, deadline_s, stacked)
                if output is CamOutput.SC:
                    obj = build_cam_sc(dataset, cam, run.sidecar.preprocess, run.model,
                                       algorithm, float(result.probability or 0.0), index)
                else:
                    obj = build_cam_pm(dataset, cam, run.sidecar.preprocess, run.model,
                                       algorithm, index)
            except (KeyError, DataError, MededgeError, ValueError, OSError) as exc:
                on_error(run, exc)
                continue
            kind = output.value
            path = folder / f"cam-{kind}-{run.model.name}-v{run.model.version}-{index}.dcm"
            write_dataset(obj, path)
            LOG.info("series CAM %s written for %s", kind, run.model)
            yield ResultFile(kind, run.model, path, str(obj.SOPInstanceUID))
