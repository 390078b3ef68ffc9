"""``mededge export --checkpoint CK --data DIR --repo REPO --model NAME``: re-export a checkpoint.

Also home of :func:`finish`, the step ``mededge train`` ends with: evaluate the checkpoint on
the held-out split, write the report folder, export to ONNX, check parity, publish.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from edge.core.errors import ExportError, MededgeError
from edge.core.types import Task
from edge.preprocess.imaging import PreprocessSpec
from trainer.datasets import SliceSet

log = logging.getLogger(__name__)

#: Metric names published per task (sidecar ``versions.N.metrics``).
PUBLISHED = {
    "classify": ("auc", "accuracy", "sensitivity", "specificity", "f1", "auc_any_touch"),
    "segment": ("dice_lung", "dice_nodule", "iou_lung", "iou_nodule", "dice_mean"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``mededge export`` flags."""
    parser.add_argument("--checkpoint", type=Path, required=True, help="best.pt or last.pt")
    parser.add_argument("--data", type=Path, required=True,
                        help="data for parity samples and evaluation (as used for training)")
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--labels-csv", type=Path)
    parser.add_argument("--label-column", default=None)
    parser.add_argument("--threshold", type=float)
    parser.add_argument("--work-dir", type=Path, help="report + ONNX (default: beside CK)")
    parser.add_argument("--parity-atol", type=float, default=1e-4)
    parser.add_argument("--parity-rtol", type=float, default=1e-4)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def _evaluate(task: str, model: Any, data: SliceSet, labels: tuple[str, ...],
              threshold: float | None, min_visible_mm: float = 0.0
              ) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Metrics on val and on the held-out split (test, else val) and what the plots need.

    Classification follows the visible-nodule rule (``min_visible_mm``; docs/training.md):
    slices it ignores are left out of the metrics, ROC and threshold, and ``auc_any_touch``
    gives the AUC without the rule.
    """
    import torch

    from trainer.datasets import IGNORED_LABEL, visible_nodule_labels
    from trainer.metrics import (
        classification_metrics,
        segmentation_metrics,
        youden_threshold,
    )
    from trainer.models import predict

    cpu = torch.device("cpu")
    val = data.subset("val")
    held = data.subset("test") if (data.splits == "test").any() else val
    p_val, p_held = predict(model, val.images, cpu), predict(model, held.images, cpu)
    out: dict[str, dict[str, float]] = {}
    extra: dict[str, Any] = {"held": held, "held_split": "test" if held is not val else "val"}
    if task == "classify":
        y_val = visible_nodule_labels(val.labels, val.nodule_mm, min_visible_mm)
        y_held = visible_nodule_labels(held.labels, held.nodule_mm, min_visible_mm)
        kv, kh = y_val != IGNORED_LABEL, y_held != IGNORED_LABEL
        thr = threshold if threshold is not None else youden_threshold(y_val[kv], p_val[kv, 1])
        out["val"] = classification_metrics(y_val[kv], p_val[kv, 1], thr).as_dict()
        cm = classification_metrics(y_held[kh], p_held[kh, 1], thr)
        out["held"] = cm.as_dict()
        for name, part, p, keep in (("val", val, p_val, kv), ("held", held, p_held, kh)):
            any_touch = classification_metrics(part.labels, p[:, 1], thr)
            out[name].update(auc_any_touch=any_touch.auc,
                             sensitivity_any_touch=any_touch.sensitivity,
                             ignored=float((~keep).sum()))
        extra.update(threshold=thr, counts=cm.counts, score=p_held[kh, 1],
                     roc_labels=y_held[kh])
    else:
        assert val.masks is not None and held.masks is not None
        out["val"] = segmentation_metrics(p_val.argmax(1), val.masks, labels)
        out["held"] = segmentation_metrics(p_held.argmax(1), held.masks, labels)
        extra["pred"] = p_held.argmax(1).astype(np.uint8)
    return out, extra


def finish(state: dict[str, Any], data: SliceSet, *, repo: Path, name: str, work_dir: Path,
           threshold: float | None = None, atol: float = 1e-4, rtol: float = 1e-4,
           max_batch_size: int = 8, train_seconds: float | None = None,
           external_data_threshold: int | None = None,
           history: list[dict[str, float]] | None = None) -> int:
    """Evaluate ``state``'s model, write ``work_dir/report``, export, check parity, publish.

    ``history`` is the whole run's per-epoch record (a best checkpoint only holds the epochs up
    to itself). Returns the published version.

    Raises:
        ExportError: export failed or ONNX Runtime disagrees with torch beyond tolerance.
        RepositoryError: publishing failed.
    """
    from trainer import report as rp
    from trainer.export import (
        EXTERNAL_DATA_THRESHOLD,
        export_and_publish,
        make_sidecar,
        provenance,
    )
    from trainer.models import ModelSpec, build_model

    task, labels = str(state["task"]), tuple(state["labels"])
    model = build_model(ModelSpec.from_dict(state["model_spec"]))
    model.load_state_dict(state["state_dict"])
    model.eval()
    rule = dict(state.get("label_rule") or {})
    metrics, extra = _evaluate(task, model, data, labels, threshold,
                               float(rule.get("min_visible_mm", 0.0)))
    held: SliceSet = extra["held"]
    out = work_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    history = list(history if history is not None else state.get("history", []))
    primary = "auc" if task == "classify" else "dice_mean"
    if history:
        rp.plot_learning_curves(history, primary, out / "learning_curves.png")
    thresholds: dict[str, float] = {}
    if task == "classify":
        rp.plot_roc(extra["roc_labels"], extra["score"], metrics["held"]["auc"], out / "roc.png")
        rp.plot_confusion(extra["counts"], labels, out / "confusion_matrix.png")
        thresholds = {labels[1]: float(extra["threshold"])}
    else:
        assert held.masks is not None
        rp.plot_overlays(held.images, held.masks, extra["pred"], labels, out / "overlays.png")
    summary = {"evaluated_on": extra["held_split"], "slices": len(held),
               "best_epoch": int(state.get("best_epoch", state.get("epoch", 0))),
               "weights": str(state.get("weights", "raw")),
               "train_seconds": train_seconds, "label_rule": rule, "val": metrics["val"],
               extra["held_split"]: metrics["held"], "load_summary": data.summary.as_dict()}
    rp.write_metrics_json(out / "metrics.json", {**summary, "history": history})
    published = {k: float(metrics["held"][k]) for k in PUBLISHED[task]}
    prov = provenance(fingerprint=str(state.get("data_fingerprint", data.fingerprint)),
                      seed=int(state.get("seed", 0)),
                      epochs=int(state.get("epochs", state.get("epoch", 0))),
                      extra={"best_epoch": summary["best_epoch"], "weights": summary["weights"],
                             **({"label_rule": rule} if rule else {})})
    sidecar = make_sidecar(Task(task), labels, PreprocessSpec.from_dict(state["preprocess"]),
                           thresholds=thresholds, prov=prov)
    samples = np.asarray(data.subset("val").images[:16], np.float32)
    if task == "classify":  # second output: the class-activation map (trainer/cam.py)
        from dataclasses import replace

        from trainer.cam import OUTPUT_NAMES, ClassifierWithCam
        from trainer.export_heads import publish_multi

        sidecar = replace(sidecar, postprocess={**sidecar.postprocess, "cam": OUTPUT_NAMES[1]})
        version, parity = publish_multi(
            ClassifierWithCam(model).eval(), samples, repo, name, sidecar, OUTPUT_NAMES,
            metrics=published, report={k: v for k, v in summary.items() if k != "load_summary"},
            work_dir=work_dir, atol=atol, rtol=rtol, max_batch_size=max_batch_size)
    else:
        version, parity = export_and_publish(
            model, samples, repo, name, sidecar, metrics=published,
            report={k: v for k, v in summary.items() if k != "load_summary"},
            work_dir=work_dir, atol=atol, rtol=rtol, max_batch_size=max_batch_size,
            external_data_threshold=external_data_threshold or EXTERNAL_DATA_THRESHOLD)
    rp.write_metrics_json(out / "metrics.json", {**summary, "history": history,
                                                 "parity": parity.as_dict(), "version": version})
    print(f"{name} v{version} ({task}) published to {repo / name}; report in {out}")
    for split, values in (("val", metrics["val"]), (extra["held_split"], metrics["held"])):
        shown = {k: round(float(values[k]), 4) for k in PUBLISHED[task]}
        print(f"  {split:<5} {shown}")
    print(f"  parity: max abs diff {parity.max_abs_diff:.2e} on {parity.samples} samples")
    return version


def run(args: argparse.Namespace) -> int:
    """Re-export a checkpoint. Returns the exit code (1 on a data/export/repository error)."""
    import torch

    from trainer.command import prepare_data

    try:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as exc:
        log.error("%s: cannot load checkpoint: %s", args.checkpoint, exc)
        return 1
    if not isinstance(state, dict) or "model_spec" not in state:
        log.error("%s: not a mededge training checkpoint", args.checkpoint)
        return 1
    spec = PreprocessSpec.from_dict(state["preprocess"])
    args.task = state["task"]
    last = args.checkpoint.resolve().parent / "last.pt"
    history = None
    if last.is_file() and last != args.checkpoint.resolve():
        history = torch.load(last, map_location="cpu", weights_only=False).get("history")
    try:
        data = prepare_data(args, spec)
        finish(state, data, repo=args.repo, name=args.model,
               work_dir=args.work_dir or args.checkpoint.resolve().parent,
               threshold=args.threshold, atol=args.parity_atol, rtol=args.parity_rtol,
               max_batch_size=args.max_batch_size, history=history)
    except ExportError as exc:
        log.error("export failed: %s", exc)
        return 1
    except MededgeError as exc:
        log.error("%s", exc)
        return 1
    return 0
