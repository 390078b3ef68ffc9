"""``mededge train segment3d``: a small 3D U-Net (MONAI ``UNet(spatial_dims=3)``) for lung and
nodule segmentation on synthetic volumes, trained on patches, served with a 3D sliding window.

Volumes: every CT slice decoded and windowed with ``edge.preprocess`` (as serving does), resized
in plane to ``--size`` (default 128: a quarter of the demo's 512, about 2.6 mm pixels); slices
are kept (2.5 mm). Patches of 32 slices x 64 x 64 (``PATCH``, ``--patch``): a third centred on
a nodule voxel (where the volume has one), a third on a lung voxel, a third anywhere.
Labels (``LABELS``): background, lung, nodule (a resized nodule pixel is nodule where at least
a quarter of it was, so small nodules survive the resize). Dice + CE, the Dice pooled over
the batch, class weights :data:`CLASS_WEIGHTS`; AdamW; docs/detection.md has the measurements.
Evaluation: global (dataset-level) Dice and IoU per class on the held-out volumes
(:func:`trainer.metrics.overlap_counts` summed over volumes), inferred exactly as the pipeline
does (:func:`edge.postprocess.sliding_window.sliding_window_inference`, 25 % overlap,
Gaussian). Published as task ``segment`` with ``postprocess.dims: 3`` and ``postprocess.patch``;
input ``image`` ``[N, 1, 32, 64, 64]``, output ``logits`` ``[N, 3, 32, 64, 64]``; the sidecar
metrics are ``dice_lung``, ``dice_nodule``, ``dice_mean`` and the IoUs.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from edge.core.errors import DataError, MededgeError
from edge.core.types import Task
from edge.postprocess.sliding_window import WindowSpec, sliding_window_inference
from edge.preprocess.dicom_pixels import read_image
from edge.preprocess.imaging import PreprocessSpec, preprocess_image
from edge.repository.sidecar import Applicability, Sidecar
from trainer.datasets.masks import read_nifti_slices
from trainer.metrics import dice_iou, overlap_counts, segmentation_summary

log = logging.getLogger(__name__)

PATCH = (32, 64, 64)  # slices, rows, columns
LABELS = ("background", "lung", "nodule")
LUNG, NODULE = 1, 2
DEFAULTS: dict[str, Any] = {"epochs": 12, "samples": 96, "batch": 4, "lr": 3e-3, "size": 128,
                            "widths": (8, 16, 32)}
#: Share of training patches centred on a nodule voxel, on a lung voxel; the rest anywhere.
NODULE_SHARE, LUNG_SHARE = 1 / 3, 1 / 3
#: Loss weight per class (background, lung, nodule), for the cross-entropy and the Dice terms.
CLASS_WEIGHTS = (1.0, 1.0, 3.0)


def build_unet3d(widths: Sequence[int] = DEFAULTS["widths"]) -> torch.nn.Module:
    """The 3D U-Net: MONAI ``UNet``, batch norm, one residual unit per level."""
    return UNet(spatial_dims=3, in_channels=1, out_channels=len(LABELS), channels=tuple(widths),
                strides=(2,) * (len(widths) - 1), num_res_units=1, norm="batch")


def _resize_mask(mask: np.ndarray, spec: PreprocessSpec, min_fraction: float) -> np.ndarray:
    """A (rows, columns) 0/1 mask on the model grid: set where >= ``min_fraction`` of it was."""
    area = cv2.resize(mask.astype(np.float32), (spec.width, spec.height),
                      interpolation=cv2.INTER_AREA)
    return (area >= min_fraction).astype(np.uint8)


def load_volumes(data: Path, spec: PreprocessSpec) -> list[dict[str, Any]]:
    """Per study: ``image`` (1, D, H, W) float32, ``mask`` (D, H, W) uint8 (:data:`LABELS`),
    ``split``, ``id``. A study that cannot be read is logged and skipped.

    Raises:
        DataError: no manifest, or no study could be read.
    """
    try:
        manifest = json.loads((data / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{data}: cannot read manifest.json: {exc}") from exc
    out = []
    for study in manifest["studies"]:
        ct = study["ct"]
        try:
            slices = [preprocess_image(d.frames[0], d.meta, spec)[0] for d in
                      (read_image(data / ct["dir"] / f) for f in ct["files"])]
            lung = read_nifti_slices(data / ct["lung_mask"])
            nodule = read_nifti_slices(data / ct["nodule_mask"])
        except (DataError, OSError) as exc:
            log.warning("%s skipped: %s", study["study_id"], exc)
            continue
        mask = np.stack([_resize_mask(m > 0, spec, 0.5) for m in lung])
        mask[np.stack([_resize_mask(m > 0, spec, 0.25) for m in nodule]) > 0] = NODULE
        out.append({"id": study["study_id"], "split": study["split"],
                    "image": np.stack(slices)[None].astype(np.float32), "mask": mask})
    if not out:
        raise DataError(f"{data}: no readable study")
    return out


def sample_patch(volume: dict[str, Any], patch: Sequence[int], rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One training patch (image (1, *patch), mask (*patch)); volumes smaller than the patch
    are zero-padded at the far end."""
    image, mask = volume["image"], volume["mask"]
    pad = [max(0, p - s) for p, s in zip(patch, mask.shape, strict=True)]
    if any(pad):
        image = np.pad(image, [(0, 0)] + [(0, p) for p in pad])
        mask = np.pad(mask, [(0, p) for p in pad])
    draw = rng.random()
    target = NODULE if draw < NODULE_SHARE else LUNG if draw < NODULE_SHARE + LUNG_SHARE else 0
    voxels = np.argwhere(mask == target) if target and (mask == target).any() else None
    if voxels is not None:
        centre = voxels[rng.integers(len(voxels))]
    else:
        centre = np.array([rng.integers(s) for s in mask.shape])
    start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, patch, mask.shape,
                                                                   strict=True)]
    sl = tuple(slice(a, a + p) for a, p in zip(start, patch, strict=True))
    return image[(slice(None),) + sl], mask[sl]


def _torch_submit(model: torch.nn.Module) -> Callable[[np.ndarray], Future[np.ndarray]]:
    def submit(batch: np.ndarray) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        with torch.no_grad():
            future.set_result(model(torch.from_numpy(batch)).numpy())
        return future
    return submit


def evaluate(model: torch.nn.Module, volumes: Sequence[dict[str, Any]],
             patch: Sequence[int]) -> dict[str, float]:
    """Global Dice / IoU per class over ``volumes`` (``dice_lung``, ``dice_nodule``,
    ``dice_mean``, ...), each volume segmented with the serving sliding window."""
    model.eval()
    window = WindowSpec(size=tuple(patch), overlap=0.25, max_batch=2)
    sums = [np.zeros(len(LABELS), np.int64) for _ in range(3)]
    for v in volumes:
        logits = sliding_window_inference(v["image"], _torch_submit(model), window)
        for total, count in zip(sums, overlap_counts(logits.argmax(0), v["mask"], len(LABELS)),
                                strict=True):
            total += count
    model.train()
    return segmentation_summary(*dice_iou(*sums), LABELS)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's budget: flags where given, else :data:`DEFAULTS`.

    Raises:
        DataError: a malformed ``--patch`` or ``--widths``.
    """
    try:
        patch = tuple(int(v) for v in args.patch.split(",")) if args.patch else PATCH
        widths = (tuple(int(v) for v in args.widths.split(",")) if args.widths
                  else DEFAULTS["widths"])
    except ValueError as exc:
        raise DataError(f"segment3d: --patch / --widths must be integers: {exc}") from exc
    if len(patch) != 3 or min(patch) < 1 or len(widths) < 2:
        raise DataError(f"segment3d: --patch needs 3 sizes, --widths 2 or more (got {patch}, "
                        f"{widths})")
    return {"patch": patch, "widths": widths, "size": args.size or DEFAULTS["size"],
            "epochs": args.epochs or DEFAULTS["epochs"], "lr": args.lr or DEFAULTS["lr"],
            "samples": args.samples_per_epoch or DEFAULTS["samples"],
            "batch": args.batch_size or DEFAULTS["batch"]}


def run_segment3d(args: argparse.Namespace) -> int:
    """Train, evaluate, export, publish. Returns the exit code."""
    from trainer.export import provenance
    from trainer.export_heads import publish_multi

    try:
        cfg = _settings(args)
        torch.manual_seed(args.seed)
        rng = np.random.default_rng(args.seed)
        spec = PreprocessSpec(height=cfg["size"], width=cfg["size"],
                              window_center=args.window_center, window_width=args.window_width)
        volumes = load_volumes(Path(args.data), spec)
        train = [v for v in volumes if v["split"] == "train"]
        held = [v for v in volumes if v["split"] == "test"] or [
            v for v in volumes if v["split"] == "val"]
        if not train or not held:
            raise DataError(f"{args.data}: need train and test (or val) studies")
        model = build_unet3d(cfg["widths"])
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True,
                             weight=torch.tensor(CLASS_WEIGHTS))
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
        started, history = time.monotonic(), []
        for epoch in range(1, cfg["epochs"] + 1):
            losses = []
            for _ in range(0, cfg["samples"], cfg["batch"]):
                pairs = [sample_patch(train[int(rng.integers(len(train)))], cfg["patch"], rng)
                         for _ in range(cfg["batch"])]
                x = torch.from_numpy(np.stack([p[0] for p in pairs]))
                y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))[:, None]
                loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses))})
            log.info("segment3d epoch %d/%d loss %.4f", epoch, cfg["epochs"],
                     history[-1]["train_loss"])
        seconds = time.monotonic() - started
        metrics = evaluate(model, held, cfg["patch"])
        model.eval()
        post = {"activation": "softmax", "argmax": True, "output": "logits", "dims": 3,
                "patch": list(cfg["patch"]), "overlap": 0.25}
        sidecar = Sidecar(task=Task.SEGMENT, labels=LABELS, preprocess=spec,
                          applicability=Applicability(modality=("CT",), body_part=("CHEST",)),
                          postprocess=post,
                          provenance=provenance(fingerprint="", seed=args.seed,
                                                epochs=cfg["epochs"],
                                                extra={"held_out": [v["id"] for v in held]}))
        samples_x = np.stack([sample_patch(held[0], cfg["patch"], rng)[0] for _ in range(2)])
        work_dir = args.work_dir or Path(args.repo).resolve().parent / "runs" / args.model
        version, parity = publish_multi(
            model, samples_x, Path(args.repo), args.model, sidecar, ("logits",),
            metrics=metrics, report={"history": history, "train_seconds": seconds,
                                     "budget": {k: list(v) if isinstance(v, tuple) else v
                                                for k, v in cfg.items()}},
            work_dir=work_dir, atol=args.parity_atol * 10, rtol=args.parity_rtol * 10,
            max_batch_size=args.max_batch_size)
    except MededgeError as exc:
        log.error("%s", exc)
        return 1
    print(f"{args.model} v{version} (segment, 3D) published to {Path(args.repo) / args.model}: "
          f"held-out Dice lung {metrics['dice_lung']:.4f} nodule {metrics['dice_nodule']:.4f}; "
          f"train {seconds:.0f}s; parity max abs diff {parity.max_abs_diff:.2e}")
    return 0
