"""``mededge train detect``: train the CenterNet detector, evaluate, export the raw heads, publish.

Data: a synthetic folder (boxes from ``labels/boxes_coco.json``, nodules from the manifest for
FROC) or a DICOM folder + label CSV with ``--coco FILE`` (mAP only). Training: AdamW, cosine
schedule, half the samples drawn from slices with boxes, random flips and intensity jitter; the
checkpoint with the best validation mAP@0.5 is kept. Training runs on 128 x 128 windows
(70 % of them around a box) of the 256 x 256 slices: the network is fully convolutional, so
it sees the same local patterns at a quarter of the cost; evaluation and serving use whole
slices. The held-out split (test, else val) gives
the published metrics (``map_50``, ``map_50_95``, ``map_50_6mm``, ``froc_cpm``, ...); the
score threshold (sidecar ``thresholds.nodule``) is chosen on validation at <= 1 FP per scan.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge.core.errors import DataError, MededgeError
from edge.core.types import Task
from edge.postprocess.detection import DecodeSpec
from edge.preprocess.imaging import PreprocessSpec
from edge.repository.sidecar import Applicability, Sidecar
from trainer.averaging import EmaWeights
from trainer.detect import (
    DetectionSet,
    attach_boxes,
    crop_batch,
    detection_loss,
    draw_targets,
    flip_batch,
)
from trainer.detect_eval import choose_threshold, evaluate, predict_heads
from trainer.models_detect import HEAD_NAMES, STRIDE, DetectorSpec, build_detector

log = logging.getLogger(__name__)

#: epochs, samples per epoch, batch, lr, input size, widths: about 7 minutes on 2 CPU cores.
#: Widths 24, 48, 96 (16, 32, 64 until 2026-12-02): over three seeds the narrower trunk missed
#: the held-out map_50_6mm >= 0.8 on one set for two of them (docs/detection.md, "A wider
#: trunk").
DEFAULTS = (30, 1024, 16, 3e-3, 256, "24,48,96")
#: Training window (px of the model input): whole slices cost 4x as much at 256.
CROP = 128
#: Share of the windows not centred on a box that are centred on a lung pixel instead of
#: anywhere (--lung-windows; needs lung masks).
LUNG_WINDOWS = 0.0
LABELS = ("nodule",)
#: 2.5D input: the volume 4 and 8 mm above and below each slice (PreprocessSpec
#: context_slices / context_spacing_mm; --context-slices, --context-spacing-mm). Chosen on
#: validation (docs/detection.md: run D1).
CONTEXT, CONTEXT_MM = 2, 4.0
#: Per-step decay of the weights' moving average that is validated and kept (0: the raw
#: weights; --ema-decay).
EMA_DECAY = 0.0
MERGE = {"min_iou": 0.3, "max_gap": 1, "max_center_mm": 5.0}


def _coco_path(args: argparse.Namespace) -> Path:
    path = getattr(args, "coco", None) or Path(args.data) / "labels" / "boxes_coco.json"
    if not Path(path).is_file():
        raise DataError(f"{path}: no COCO box file (give --coco FILE for a DICOM folder)")
    return Path(path)


def load_detection_data(args: argparse.Namespace, spec: PreprocessSpec
                        ) -> tuple[DetectionSet, dict[str, Any] | None]:
    """Slices + boxes, and the manifest when the folder is synthetic.

    Raises:
        DataError: no data, no box file, or an empty training or validation split.
    """
    from trainer.datasets import load_data

    data = load_data(args.data, spec.single_slice(), labels=("no_nodule", "nodule"),
                     labels_csv=args.labels_csv, use_cache=not args.no_cache,
                     progress=not args.no_progress)
    data.summary.log(str(args.data))
    # all slices are loaded: each gets its real neighbours
    data = data.with_context(spec.context_slices, spec.context_spacing_mm)
    dset = attach_boxes(data, _coco_path(args), spec, LABELS)
    for split in ("train", "val"):
        if not (dset.slices.splits == split).any():
            raise DataError(f"{args.data}: no {split} slices with box annotations")
    manifest_path = Path(args.data) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    return dset, manifest


def train_detector(model: torch.nn.Module, train: DetectionSet, val: DetectionSet,
                   coco: Path, spec: PreprocessSpec, decode: DecodeSpec, *, epochs: int,
                   samples: int, batch: int, lr: float, seed: int, work_dir: Path,
                   progress: bool = False, crop: int = CROP, lung_windows: float = 0.0,
                   ema_decay: float = 0.0, meta: dict[str, Any] | None = None
                   ) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Train; returns the best state (by validation mAP@0.5) and the per-epoch history.

    With ``ema_decay > 0`` an exponential moving average of the weights
    (trainer/averaging.py) is what is validated and kept; the last raw and averaged weights
    are saved too (``last.pt``). ``meta`` (model spec, preprocessing) goes into both files,
    so they can be scored alone (``python -m trainer.heldout``).
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(samples / batch)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    positive = np.array([len(b) > 0 for b in train.boxes])
    weights = np.where(positive, 0.5 / max(positive.sum(), 1),
                       0.5 / max((~positive).sum(), 1))
    weights /= weights.sum()
    images = train.slices.images
    masks = train.slices.masks
    lung = None if masks is None or lung_windows <= 0 else (masks == 1) | (masks == 2)
    h, w = min(crop, images.shape[-2]), min(crop, images.shape[-1])
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {}
    best_metric = -1.0
    ema = EmaWeights(model, ema_decay) if ema_decay > 0 else None
    for epoch in range(1, epochs + 1):
        t0 = time.monotonic()
        model.train()
        order = rng.choice(len(train), size=samples, p=weights)
        losses = []
        for start in range(0, samples, batch):
            idx = order[start:start + batch]
            x, boxes = crop_batch(images[idx], [train.boxes[i] for i in idx], crop, rng,
                                  decode.stride, lung=None if lung is None else lung[idx],
                                  lung_share=lung_windows)
            x, boxes = flip_batch(x, boxes, rng)
            gain = rng.uniform(0.95, 1.05, (len(idx), 1, 1, 1))
            x = (x * gain + rng.uniform(-0.05, 0.05, (len(idx), 1, 1, 1))).astype(np.float32)
            targets = {k: torch.from_numpy(v)
                       for k, v in draw_targets(boxes, h, w, decode).items()}
            loss = detection_loss(model(torch.from_numpy(np.ascontiguousarray(x))), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
            losses.append(float(loss.detach()))
        judged = model if ema is None else ema.model  # what is validated and kept
        metrics, _, _ = evaluate(predict_heads(judged, val.slices.images), val, coco, spec,
                                 decode, None)
        row = {"epoch": float(epoch), "train_loss": float(np.mean(losses)),
               "val_map_50": metrics["map_50"], "seconds": time.monotonic() - t0}
        history.append(row)
        metric = -1.0 if math.isnan(metrics["map_50"]) else metrics["map_50"]
        if metric > best_metric or not best:
            best_metric = metric
            best = {"state_dict": {k: v.clone() for k, v in judged.state_dict().items()},
                    "epoch": epoch, "best_metric": metric}
        log.info("epoch %d/%d loss %.4f val map_50 %.4f %.1fs", epoch, epochs,
                 row["train_loss"], metrics["map_50"], row["seconds"])
        if progress:
            print(f"epoch {epoch}/{epochs} loss {row['train_loss']:.4f} val map_50 "
                  f"{metrics['map_50']:.4f} ({row['seconds']:.0f}s)", flush=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.save({**(meta or {}), **best}, work_dir / "best.pt")
    torch.save({**(meta or {}), "state_dict": model.state_dict(), "epoch": epochs,
                **({} if ema is None else {"ema_state_dict": ema.state_dict()})},
               work_dir / "last.pt")
    return best, history


def run_detect(args: argparse.Namespace) -> int:
    """Train, evaluate, export the raw heads, check parity, publish. Returns the exit code."""
    from trainer import report as rp
    from trainer.export import provenance
    from trainer.export_heads import publish_multi

    epochs, samples, batch, lr, size, widths = DEFAULTS
    try:
        torch.manual_seed(args.seed)
        context = getattr(args, "context_slices", None)
        context = CONTEXT if context is None else context
        context_mm = getattr(args, "context_spacing_mm", None)
        context_mm = CONTEXT_MM if context_mm is None else context_mm or None  # 0: next slices
        spec = PreprocessSpec(height=args.size or size, width=args.size or size,
                              window_center=args.window_center, window_width=args.window_width,
                              context_slices=context,
                              context_spacing_mm=context_mm if context else None)
        dset, manifest = load_detection_data(args, spec)
        coco = _coco_path(args)
        train, val = dset.subset("train"), dset.subset("val")
        held_split = "test" if (dset.slices.splits == "test").any() else "val"
        held = dset.subset(held_split)
        decode = DecodeSpec(stride=STRIDE)
        mspec = DetectorSpec(num_classes=len(LABELS),
                             widths=tuple(int(v) for v in (args.widths or widths).split(",")),
                             in_channels=spec.channels)
        mspec = replace(mspec, layers=(1,) * len(mspec.widths))
        model = build_detector(mspec)
        work_dir = args.work_dir or args.repo.resolve().parent / "runs" / args.model
        started = time.monotonic()
        log.info("detect: %d train / %d val / %d %s slices", len(train), len(val), len(held),
                 held_split)
        best, history = train_detector(
            model, train, val, coco, spec, decode, epochs=args.epochs or epochs,
            samples=args.samples_per_epoch or samples, batch=args.batch_size or batch,
            lr=args.lr or lr, seed=args.seed, work_dir=work_dir,
            progress=not args.no_progress,
            lung_windows=LUNG_WINDOWS if getattr(args, "lung_windows", None) is None
            else args.lung_windows,
            meta={"task": "detect", "model_spec": mspec.to_dict(),
                  "preprocess": spec.to_dict(), "labels": list(LABELS)},
            ema_decay=EMA_DECAY if getattr(args, "ema_decay", None) is None else args.ema_decay)
        seconds = time.monotonic() - started
        model.load_state_dict(best["state_dict"])
        model.eval()
        val_metrics, truths, cands = evaluate(predict_heads(model, val.slices.images), val,
                                              coco, spec, decode, manifest)
        threshold = args.threshold if args.threshold is not None else choose_threshold(
            truths, cands)
        held_metrics, _, _ = evaluate(predict_heads(model, held.slices.images), held, coco,
                                      spec, decode, manifest, threshold)
        out = work_dir / "report"
        out.mkdir(parents=True, exist_ok=True)
        rp.plot_learning_curves(history, "map_50", out / "learning_curves.png")
        summary = {"evaluated_on": held_split, "slices": len(held), "train_seconds": seconds,
                   "best_epoch": int(best["epoch"]), "threshold": threshold,
                   "val": val_metrics, held_split: held_metrics}
        prov = provenance(fingerprint=dset.slices.fingerprint, seed=args.seed,
                          epochs=args.epochs or epochs, extra={"best_epoch": best["epoch"],
                                                               "model_spec": mspec.to_dict()})
        post = {**asdict(decode), "size_encoding": decode.size_encoding.value,
                "outputs": list(HEAD_NAMES), "merge": dict(MERGE)}
        sidecar = Sidecar(task=Task.DETECT, labels=LABELS, preprocess=spec,
                          applicability=Applicability(modality=("CT",), body_part=("CHEST",)),
                          thresholds={"nodule": threshold}, postprocess=post, provenance=prov)
        published = {k: float(v) for k, v in held_metrics.items() if isinstance(v, float)}
        version, parity = publish_multi(
            model, val.slices.images[:8], args.repo, args.model, sidecar, HEAD_NAMES,
            metrics=published, report=summary, work_dir=work_dir,
            atol=args.parity_atol, rtol=args.parity_rtol, max_batch_size=args.max_batch_size)
        rp.write_metrics_json(out / "metrics.json", {**summary, "history": history,
                                                     "parity": parity.as_dict(),
                                                     "version": version})
    except MededgeError as exc:
        log.error("%s", exc)
        return 1
    keys = ("map_50", "map_50_95", "map_50_6mm", "froc_cpm", "froc_cpm_6mm")
    print(f"{args.model} v{version} (detect) published to {args.repo / args.model}; "
          f"report in {out}")
    for split, values in (("val", val_metrics), (held_split, held_metrics)):
        print(f"  {split:<5} " + str({k: round(float(values[k]), 4) for k in keys
                                     if k in values}))
    print(f"  threshold {threshold:.2f}; train {seconds:.0f}s; parity max abs diff "
          f"{parity.max_abs_diff:.2e}")
    return 0
