"""``mededge train segment3d``: a small 3D U-Net (MONAI ``UNet(spatial_dims=3)``) for lung
segmentation on synthetic volumes, trained on patches, served with a 3D sliding window.

Volumes: every CT slice decoded and windowed with ``edge.preprocess`` (as serving does), resized
in plane to ``--size`` (default 128: a quarter of the demo's 512, about 2.6 mm pixels); slices
are kept (2.5 mm). Patches of 32 slices x 64 x 64 (``PATCH``), two thirds centred in the lung.
Labels: background, lung (the nodule mask counts as lung tissue here). Dice + CE, AdamW.
Evaluation: Dice of the lung on the held-out volumes, inferred exactly as the pipeline does
(:func:`edge.postprocess.sliding_window.sliding_window_inference`, 25 % overlap, Gaussian).
Published as task ``segment`` with ``postprocess.dims: 3`` and ``postprocess.patch``; input
``image`` ``[N, 1, 32, 64, 64]``, output ``logits`` ``[N, 2, 32, 64, 64]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
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

log = logging.getLogger(__name__)

PATCH = (32, 64, 64)  # slices, rows, columns
LABELS = ("background", "lung")
DEFAULTS = {"epochs": 4, "samples": 96, "batch": 4, "lr": 3e-3, "size": 128}


def build_unet3d(widths: tuple[int, ...] = (8, 16, 32)) -> torch.nn.Module:
    """The 3D U-Net: MONAI ``UNet``, batch norm, one residual unit per level."""
    return UNet(spatial_dims=3, in_channels=1, out_channels=len(LABELS), channels=widths,
                strides=(2,) * (len(widths) - 1), num_res_units=1, norm="batch")


def load_volumes(data: Path, spec: PreprocessSpec) -> list[dict[str, Any]]:
    """Per study: ``image`` (1, D, H, W) float32, ``mask`` (D, H, W) uint8, ``split``, id.

    Raises:
        DataError: no manifest, or no study could be read.
    """
    manifest = json.loads((data / "manifest.json").read_text())
    out = []
    for study in manifest["studies"]:
        ct = study["ct"]
        try:
            slices = [preprocess_image(d.frames[0], d.meta, spec)[0] for d in
                      (read_image(data / ct["dir"] / f) for f in ct["files"])]
            lung = read_nifti_slices(data / ct["lung_mask"])
        except (DataError, OSError) as exc:
            log.warning("%s skipped: %s", study["study_id"], exc)
            continue
        mask = np.stack([cv2.resize((m > 0).astype(np.uint8), (spec.width, spec.height),
                                    interpolation=cv2.INTER_NEAREST) for m in lung])
        out.append({"id": study["study_id"], "split": study["split"],
                    "image": np.stack(slices)[None].astype(np.float32), "mask": mask})
    if not out:
        raise DataError(f"{data}: no readable study")
    return out


def _patch(volume: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image, mask = volume["image"], volume["mask"]
    pad = [max(0, p - s) for p, s in zip(PATCH, mask.shape, strict=True)]
    if any(pad):
        image = np.pad(image, [(0, 0)] + [(0, p) for p in pad])
        mask = np.pad(mask, [(0, p) for p in pad])
    if rng.random() < 2 / 3 and mask.any():
        centre = np.argwhere(mask)[rng.integers(int(mask.sum()))]
    else:
        centre = np.array([rng.integers(s) for s in mask.shape])
    start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, PATCH, mask.shape,
                                                                   strict=True)]
    sl = tuple(slice(a, a + p) for a, p in zip(start, PATCH, strict=True))
    return image[(slice(None), *sl)], mask[sl]


def _torch_submit(model: torch.nn.Module):  # type: ignore[no-untyped-def]
    def submit(batch: np.ndarray) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        with torch.no_grad():
            future.set_result(model(torch.from_numpy(batch)).numpy())
        return future
    return submit


def lung_dice(model: torch.nn.Module, volumes: list[dict[str, Any]]) -> float:
    """Mean lung Dice over ``volumes``, sliding window as in serving."""
    model.eval()
    window = WindowSpec(size=PATCH, overlap=0.25, max_batch=2)
    scores = []
    for v in volumes:
        logits = sliding_window_inference(v["image"], _torch_submit(model), window)
        pred, ref = logits.argmax(0) == 1, v["mask"] == 1
        scores.append(2 * float((pred & ref).sum()) / max(1.0, float(pred.sum() + ref.sum())))
    model.train()
    return float(np.mean(scores)) if scores else float("nan")


def run_segment3d(args: argparse.Namespace) -> int:
    """Train, evaluate, export, publish. Returns the exit code."""
    from trainer.export import provenance
    from trainer.export_heads import publish_multi

    try:
        torch.manual_seed(args.seed)
        rng = np.random.default_rng(args.seed)
        size = args.size or DEFAULTS["size"]
        spec = PreprocessSpec(height=size, width=size, window_center=args.window_center,
                              window_width=args.window_width)
        volumes = load_volumes(Path(args.data), spec)
        train = [v for v in volumes if v["split"] == "train"]
        held = [v for v in volumes if v["split"] == "test"] or [
            v for v in volumes if v["split"] == "val"]
        if not train or not held:
            raise DataError(f"{args.data}: need train and test (or val) studies")
        model = build_unet3d()
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr or DEFAULTS["lr"])
        epochs = args.epochs or DEFAULTS["epochs"]
        samples = args.samples_per_epoch or DEFAULTS["samples"]
        batch = args.batch_size or DEFAULTS["batch"]
        started, history = time.monotonic(), []
        for epoch in range(1, epochs + 1):
            losses = []
            for _ in range(0, samples, batch):
                pairs = [_patch(train[int(rng.integers(len(train)))], rng) for _ in range(batch)]
                x = torch.from_numpy(np.stack([p[0] for p in pairs]))
                y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))[:, None]
                loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses))})
            log.info("segment3d epoch %d/%d loss %.4f", epoch, epochs, history[-1]["train_loss"])
        seconds = time.monotonic() - started
        dice = lung_dice(model, held)
        model.eval()
        post = {"activation": "softmax", "argmax": True, "output": "logits", "dims": 3,
                "patch": list(PATCH), "overlap": 0.25}
        sidecar = Sidecar(task=Task.SEGMENT, labels=LABELS, preprocess=spec,
                          applicability=Applicability(modality=("CT",), body_part=("CHEST",)),
                          postprocess=post,
                          provenance=provenance(fingerprint="", seed=args.seed, epochs=epochs))
        samples_x = np.stack([_patch(held[0], rng)[0] for _ in range(2)])
        work_dir = args.work_dir or Path(args.repo).resolve().parent / "runs" / args.model
        version, parity = publish_multi(
            model, samples_x, Path(args.repo), args.model, sidecar, ("logits",),
            metrics={"dice_lung": dice}, report={"history": history, "train_seconds": seconds},
            work_dir=work_dir, atol=args.parity_atol * 10, rtol=args.parity_rtol * 10,
            max_batch_size=args.max_batch_size)
    except MededgeError as exc:
        log.error("%s", exc)
        return 1
    print(f"{args.model} v{version} (segment, 3D) published to {Path(args.repo) / args.model}: "
          f"held-out lung Dice {dice:.4f}; train {seconds:.0f}s; parity max abs diff "
          f"{parity.max_abs_diff:.2e}")
    return 0
