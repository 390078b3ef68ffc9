"""Held-out evaluation of a model file with its task metric, and output agreement between two.

Task metrics (higher is better): classification ``auc`` (the last class's softmax score against
``label == last class``; a single-logit model uses its sigmoid), segmentation ``dice_mean``
(dataset-level Dice over the foreground classes; mask pixels marked 255 are ignored),
detection ``map_50`` (COCO mAP@0.5 over every held-out box: the raw heads decoded with the
sidecar's settings exactly as serving decodes them, by the trainer's own evaluation,
``trainer.detect_eval.evaluate``, which needs the [train] extra).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from converters.calibration import IGNORE, SampleSet, batches
from edge.core.errors import DataError
from edge.core.types import Task

#: A model on a batch: its output, or for a multi-output model (a detector's heads) every
#: output by name.
Outputs = np.ndarray | Mapping[str, np.ndarray]
Runner = Callable[[np.ndarray], Outputs]


@dataclass(frozen=True)
class Agreement:
    """How closely a candidate's outputs follow the reference's on the same inputs.

    ``top1`` is the fraction of argmax decisions (per image, or per pixel for segmentation)
    that agree.
    """

    top1: float
    max_abs_diff: float
    mean_abs_diff: float

    def as_dict(self) -> dict[str, float]:
        return {"top1_agreement": self.top1, "max_abs_diff": self.max_abs_diff,
                "mean_abs_diff": self.mean_abs_diff}


def onnx_runner(path: str, output: str | None = None, threads: int = 0,
                all_outputs: bool = False) -> Runner:
    """A function running the ONNX file at ``path`` on ONNX Runtime's CPU provider; it returns
    ``output`` (default the first), or with ``all_outputs`` every output by name.

    Raises:
        DataError: the model has more than one input.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    session = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise DataError(f"{path}: evaluation supports one input, the model has {len(inputs)}")
    name = inputs[0].name
    if all_outputs:
        names = [o.name for o in session.get_outputs()]
        return lambda x: dict(zip(names, session.run(names, {name: x}), strict=True))
    out = output or session.get_outputs()[0].name
    return lambda x: session.run([out], {name: x})[0]


def predict(run: Runner, samples: SampleSet, batch_size: int = 8) -> Outputs:
    """The model's outputs for every sample, batched along axis 0 (per output by name for a
    multi-output runner)."""
    parts = [run(b) for b in batches(samples.images, batch_size)]
    if parts and isinstance(parts[0], Mapping):
        return {k: np.concatenate([np.asarray(p[k], dtype=np.float32) for p in parts])
                for k in parts[0]}
    return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])


def _softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def task_metric(task: Task, outputs: Outputs, samples: SampleSet,
                labels: Sequence[str], postprocess: Mapping[str, Any] | None = None
                ) -> tuple[str, float]:
    """The task metric's name and value for ``outputs`` on ``samples``; ``postprocess`` is the
    sidecar's (a detector's decoding settings).

    Raises:
        DataError: the samples carry no reference for this task (no labels / masks / boxes,
            or only one class present for AUC).
    """
    from trainer.metrics import dice_iou, overlap_counts, roc_auc, segmentation_summary

    if task is Task.DETECT:
        return "map_50", _detection_map(outputs, samples, postprocess or {})
    assert isinstance(outputs, np.ndarray)
    if task is Task.CLASSIFY:
        if samples.labels is None or np.any(samples.labels < 0):
            raise DataError(f"{samples.source}: classification needs a label for every sample")
        if outputs.shape[1] > 1:
            positive, score = outputs.shape[1] - 1, _softmax(outputs)[:, -1]
        else:
            positive, score = 1, 1.0 / (1.0 + np.exp(-outputs[:, 0]))
        value = roc_auc(samples.labels == positive, score)
        if not np.isfinite(value):
            raise DataError(f"{samples.source}: AUC needs both classes among the held-out "
                            "samples; use a larger or different split")
        return "auc", value
    if task is Task.SEGMENT:
        if samples.masks is None:
            raise DataError(f"{samples.source}: segmentation needs reference masks")
        pred = outputs.argmax(axis=1)
        valid = samples.masks != IGNORE
        if not valid.any():
            raise DataError(f"{samples.source}: every mask pixel is marked 'no reference'")
        classes = max(outputs.shape[1], len(labels))
        inter, n_pred, n_ref = overlap_counts(pred[valid], samples.masks[valid], classes)
        dice, iou = dice_iou(inter, n_pred, n_ref)
        names = list(labels) if len(labels) == classes else [str(k) for k in range(classes)]
        return "dice_mean", segmentation_summary(dice, iou, names)["dice_mean"]
    raise DataError(f"task {task.value}: no accuracy metric for it")


def _detection_map(outputs: Outputs, samples: SampleSet, postprocess: Mapping[str, Any]
                   ) -> float:
    from edge.postprocess.slice_boxes import decode_spec
    from trainer.detect_eval import evaluate

    truth = samples.detection
    if truth is None:
        raise DataError(f"{samples.source}: detection needs held-out boxes (a synthetic folder, "
                        "or a labelled DICOM folder with its COCO file)")
    if not any(len(b) for b in truth.data.boxes):
        raise DataError(f"{samples.source}: no boxes among the held-out slices; mAP needs some "
                        "(use a larger or different split)")
    if not isinstance(outputs, Mapping):
        raise DataError("detection: the model's heads are needed by name (heatmap, size, "
                        "offset)")
    names = list(postprocess.get("outputs") or ("heatmap", "size", "offset"))
    heads = {"heatmap": outputs[names[0]], "size": outputs[names[1]],
             "offset": outputs[names[2]]}
    metrics, _, _ = evaluate(heads, truth.data, truth.coco, truth.spec,
                             decode_spec(postprocess), truth.manifest)
    return float(metrics["map_50"])


def agreement(reference: Outputs, candidate: Outputs) -> Agreement:
    """Output agreement of ``candidate`` with ``reference`` (same shapes); for multi-output
    models the differences are over every output and top-1 is not defined (NaN).

    Raises:
        DataError: the shapes differ.
    """
    if isinstance(reference, Mapping) or isinstance(candidate, Mapping):
        if not (isinstance(reference, Mapping) and isinstance(candidate, Mapping)) or \
                set(reference) != set(candidate):
            raise DataError("outputs differ: reference and candidate give other outputs")
        parts = [agreement(reference[k], candidate[k]) for k in reference]
        sizes = [reference[k].size for k in reference]
        return Agreement(float("nan"), max(a.max_abs_diff for a in parts),
                         float(np.average([a.mean_abs_diff for a in parts], weights=sizes)))
    if reference.shape != candidate.shape:
        raise DataError(f"output shapes differ: reference {reference.shape}, candidate "
                        f"{candidate.shape}")
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    top1 = float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1))) \
        if reference.ndim > 1 and reference.shape[1] > 1 else float("nan")
    return Agreement(top1, float(diff.max()), float(diff.mean()))


def metrics_summary(values: Mapping[str, float]) -> str:
    """``name=value`` pairs for a log line."""
    return ", ".join(f"{k}={v:.4f}" for k, v in values.items())
