"""Held-out evaluation of a model file with its task metric, and output agreement between two.

Task metrics (higher is better): classification ``auc`` (the last class's softmax score against
``label == last class``; a single-logit model uses its sigmoid), segmentation ``dice_mean``
(dataset-level Dice over the foreground classes; mask pixels marked 255 are ignored).
Detection's mAP is not implemented until a detection model exists; asking for it raises.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from converters.calibration import IGNORE, SampleSet, batches
from edge.core.errors import DataError
from edge.core.types import Task

Runner = Callable[[np.ndarray], np.ndarray]


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


def onnx_runner(path: str, output: str | None = None, threads: int = 0) -> Runner:
    """A function running the ONNX file at ``path`` on ONNX Runtime's CPU provider.

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
    out = output or session.get_outputs()[0].name
    return lambda x: session.run([out], {name: x})[0]


def predict(run: Runner, samples: SampleSet, batch_size: int = 8) -> np.ndarray:
    """The model's outputs for every sample, batched along axis 0."""
    return np.concatenate([np.asarray(run(b), dtype=np.float32)
                           for b in batches(samples.images, batch_size)])


def _softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def task_metric(task: Task, outputs: np.ndarray, samples: SampleSet,
                labels: Sequence[str]) -> tuple[str, float]:
    """The task metric's name and value for ``outputs`` on ``samples``.

    Raises:
        DataError: the samples carry no reference for this task (no labels / masks, or only
            one class present for AUC), or the task is detection.
    """
    from trainer.metrics import dice_iou, overlap_counts, roc_auc, segmentation_summary

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
    raise DataError(f"task {task.value}: mAP evaluation is not implemented yet")


def agreement(reference: np.ndarray, candidate: np.ndarray) -> Agreement:
    """Output agreement of ``candidate`` with ``reference`` (same shapes).

    Raises:
        DataError: the shapes differ.
    """
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
