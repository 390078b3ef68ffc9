"""``mededge train {classify,segment} --data DIR --repo REPO --model NAME [--epochs N]``.

Loads and preprocesses the data (with ``edge.preprocess``, as serving does), trains with the
budget below, evaluates the best checkpoint on the held-out split, writes a report folder, then
exports to ONNX, checks parity and publishes a new version. Under ``torchrun`` every rank
trains; rank 0 alone evaluates, reports and publishes.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from edge.core.errors import DataError, MededgeError
from edge.preprocess.imaging import PreprocessSpec
from trainer.datasets import CLASSIFY_LABELS, SEGMENT_LABELS, SliceSet, load_data

log = logging.getLogger(__name__)

#: Per task: (epochs, samples per epoch, batch size, learning rate, input size, widths). Sized
#: so each model trains in a few minutes on an idle 2-core CPU on `make demo` data (60
#: studies). The classifier: 20 epochs, about 10 s each at load ~1-2 (validating four flip
#: views each, see CLASSIFY_FLIP_VIEWS); on 60 studies twice the
#: epochs of the 24-study default raised the held-out AUC by 0.03, twice again by 0.003
#: (docs/training.md: runs n1, n3, n4).
DEFAULTS = {
    "classify": (20, 1024, 32, 3e-3, 256, "16,32,64"),
    "segment": (12, 1024, 16, 3e-3, 128, "16,32,64,128"),
}

#: Classifier only: training window (px of the model input; 0 = whole frame), evidence-map
#: stride (0 = deepest stage, no decoder), and the visible-nodule rule's diameter (mm).
CLASSIFY_CROP, CLASSIFY_HEAD_STRIDE, MIN_VISIBLE_MM = 128, 4, 3.0
#: Classifier: 2.5D input, the volume 2, 4, 6 and 8 mm above and below each slice (9
#: channels; PreprocessSpec.context_slices / context_spacing_mm), and where negative windows
#: are drawn (trainer/classify.py: crop_origins). The 4 mm steps (5 channels, run c8) missed
#: 0.95 on the seed-1007 held-out studies for seed 2 on an Intel host (0.9416) and seed 0 on
#: an EPYC host (0.9364); the 2 mm steps cleared it for all three seeds (docs/training.md:
#: runs c2s0-c2s2), with the same compute past the first convolution.
CLASSIFY_CONTEXT, CLASSIFY_CONTEXT_MM, CLASSIFY_NEGATIVES = 4, 2.0, "lung"
NEGATIVE_MODES = ("lung", "lung-border")
#: Classifier: positive slices with a nodule cross-section under CLASSIFY_SMALL_MM are drawn
#: CLASSIFY_SMALL_WEIGHT times as often as the others (the misses are small cross-sections;
#: drawing them 3x as often lowered both held-out AUCs, docs/training.md: run s3w3).
CLASSIFY_SMALL_MM, CLASSIFY_SMALL_WEIGHT = 8.0, 1.0
#: Classifier: share of training draws flipped front-back (left-right: always half), and the
#: flips whose evidence maps the exported graph averages with the input's
#: (ModelSpec.flip_views): over two seeds +0.026 on the seed-8 held-out studies and +0.006 on
#: the seed-1007 ones, at 4x the inference compute (docs/training.md: runs t2, t2s1).
CLASSIFY_VFLIP, CLASSIFY_FLIP_VIEWS = 0.5, ("h", "v", "hv")
#: Classifier: share of training draws flipped through-plane (AugmentSpec.depth_flip_prob).
CLASSIFY_DEPTH_FLIP = 0.0
#: Classifier: gate the nodule evidence by a predicted lung map (trainer/models.py); no better
#: on the larger validation set (docs/training.md), so off by default.
CLASSIFY_LUNG_GATE = False
#: Classifier: publish the uniform average of the weights of the last N epochs (SWA,
#: trainer/averaging.py; batch-norm statistics measured anew) instead of the checkpoint with
#: the best validation AUC, which the 592-slice validation split can pick badly (a spike at
#: epoch 11 for seed 1). N = 3 had the best validation AUC of N in 3, 5, 10, 20 for both
#: seeds (docs/training.md: "Averaged weights"); 0: the validation maximum.
CLASSIFY_AVERAGE_LAST = 3
#: Classifier: how the 2.5D training, validation and test slices are held in memory. float16
#: (default since 2026-12-01) halves the channels of every 256 x 256 slice (5.6 GB as
#: float32 for the 60-study demo at 5 channels); each batch is cast to float32. The rounding
#: (<= 2.4e-4 in [0.5, 1)) is far below the augmentation's noise (0.02); with the split
#: subsets as views the run's peak RSS went from 13.3 to 4.7 GB (docs/training.md: "Float16
#: slices").
CLASSIFY_STORAGE = "float16"
STORAGE_DTYPES = ("float16", "float32")
#: Classify/segment: per-step decay of the weights' moving average that is validated and
#: kept (trainer/averaging.py; 0: the raw weights).
EMA_DECAY = {"classify": 0.0, "segment": 0.0}

#: Tasks trained by their own modules (trainer/detect_train.py, trainer/train3d.py).
OTHER_TASKS = ("detect", "segment3d")


def _flip_views(text: str) -> tuple[str, ...]:
    """``--flip-average``: 'none' or a comma list of :data:`trainer.models.FLIP_DIMS` keys."""
    from trainer.models import FLIP_DIMS

    views = () if text.strip() in ("", "none") else tuple(v.strip() for v in text.split(","))
    bad = [v for v in views if v not in FLIP_DIMS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown flips {bad}; use none or a comma list of "
                                         f"{', '.join(FLIP_DIMS)}")
    return views


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``mededge train`` flags."""
    parser.add_argument("task", choices=sorted([*DEFAULTS, *OTHER_TASKS]),
                        help="what the model does")
    parser.add_argument("--data", type=Path, required=True,
                        help="synthetic folder (manifest.json) or DICOM folder + label CSV")
    parser.add_argument("--repo", type=Path, required=True, help="model repository")
    parser.add_argument("--model", required=True, help="model name in the repository")
    parser.add_argument("--epochs", type=int, help="epochs (default per task)")
    parser.add_argument("--samples-per-epoch", type=int, help="slices drawn per epoch")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="peak learning rate (AdamW, cosine)")
    parser.add_argument("--size", type=int, help="input height = width (default per task)")
    parser.add_argument("--window-center", type=float, default=-600.0, help="HU")
    parser.add_argument("--window-width", type=float, default=1500.0, help="HU")
    parser.add_argument("--widths", help="channels per stage/level (default per task)")
    parser.add_argument("--labels-csv", type=Path, help="label CSV of a DICOM folder")
    parser.add_argument("--label-column", default=None,
                        help="CSV label column (default: label, or nodule_present)")
    parser.add_argument("--min-visible-mm", type=float, default=MIN_VISIBLE_MM,
                        help="classify: a slice is positive when a nodule cross-section on it "
                             "is at least this wide, ignored when only a smaller cap touches "
                             "it (0: every touched slice is positive)")
    parser.add_argument("--crop", type=int, default=CLASSIFY_CROP,
                        help="classify: train on windows this size (0: whole frames)")
    parser.add_argument("--head-stride", type=int, default=CLASSIFY_HEAD_STRIDE,
                        help="classify: evidence-map stride (0: deepest stage, no decoder)")
    parser.add_argument("--stem-pool", action=argparse.BooleanOptionalAction, default=True,
                        help="classify: max-pooling after the stride-2 stem (4x down before "
                             "the first stage); --no-stem-pool keeps the first stage at stride 2")
    parser.add_argument("--context-slices", type=int, default=None,
                        help="classify/detect: 2.5D input, each slice stacked with this many "
                             "neighbours on each side along the slice normal (0: one slice; "
                             "default per task)")
    parser.add_argument("--context-spacing-mm", type=float, default=None,
                        help="classify/detect: with --context-slices, the neighbours are the "
                             "volume at multiples of this distance along the normal (linear "
                             "between slices); 0: the next slices (default per task)")
    parser.add_argument("--negatives", choices=NEGATIVE_MODES, default=CLASSIFY_NEGATIVES,
                        help="classify: where negative training windows are centred: 'lung' "
                             "(half on lung pixels, half anywhere) or 'lung-border' (a third "
                             "each on lung pixels, just outside the lung, anywhere)")
    parser.add_argument("--small-nodule-mm", type=float, default=CLASSIFY_SMALL_MM,
                        help="classify: positive slices whose largest nodule cross-section is "
                             "under this (mm) are drawn --small-nodule-weight times as often")
    parser.add_argument("--small-nodule-weight", type=float, default=CLASSIFY_SMALL_WEIGHT,
                        help="classify: see --small-nodule-mm (1: every positive alike)")
    parser.add_argument("--vertical-flip", type=float, default=CLASSIFY_VFLIP,
                        help="classify: share of training draws flipped front-back")
    parser.add_argument("--depth-flip", type=float, default=CLASSIFY_DEPTH_FLIP,
                        help="classify: share of training draws flipped through-plane (the "
                             "2.5D context channels in reverse order)")
    parser.add_argument("--flip-average", type=_flip_views, default=CLASSIFY_FLIP_VIEWS,
                        help="classify: average the evidence map over these flips inside the "
                             "graph (comma list of h, v, hv, z, hz, vz, hvz; z: through-plane, "
                             "the 2.5D context reversed; 'none': one view)")
    parser.add_argument("--storage", choices=STORAGE_DTYPES, default=CLASSIFY_STORAGE,
                        help="classify: dtype the 2.5D slices are held in (float16 halves "
                             "the memory; batches are cast to float32)")
    parser.add_argument("--lung-gate", action=argparse.BooleanOptionalAction,
                        default=CLASSIFY_LUNG_GATE,
                        help="classify: a lung head gates the nodule evidence (needs masks)")
    parser.add_argument("--lung-windows", type=float, default=None,
                        help="detect: share of the windows not centred on a box that are "
                             "centred on a lung pixel (hard negatives; default per task)")
    parser.add_argument("--ema-decay", type=float, default=None,
                        help="classify/segment/detect: validate, keep and publish a moving "
                             "average of the weights with this per-step decay (0: the raw "
                             "weights; default per task)")
    parser.add_argument("--average-last", type=int, default=None,
                        help="classify/segment: publish the average of the weights of the last "
                             "N epochs, batch-norm statistics recomputed (0: the checkpoint "
                             "with the best validation metric; default per task)")
    parser.add_argument("--snapshots", action="store_true",
                        help="classify/segment: keep every epoch's weights in WORK/epochs/")
    parser.add_argument("--threshold", type=float,
                        help="classification threshold (default: Youden's J on validation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    parser.add_argument("--resume", action="store_true", help="continue from WORK/last.pt")
    parser.add_argument("--work-dir", type=Path,
                        help="checkpoints and report (default: REPO/../runs/MODEL)")
    parser.add_argument("--no-cache", action="store_true", help="do not use the .npz cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--parity-atol", type=float, default=1e-4)
    parser.add_argument("--parity-rtol", type=float, default=1e-4)
    parser.add_argument("--max-batch-size", type=int, default=8, help="config.pbtxt")
    parser.add_argument("--coco", type=Path,
                        help="detect: COCO box file (default DATA/labels/boxes_coco.json)")
    parser.add_argument("--patch", help="segment3d: training and serving patch as "
                                         "SLICES,ROWS,COLUMNS (default 32,64,64)")


def labels_for(task: str) -> tuple[str, ...]:
    return CLASSIFY_LABELS if task == "classify" else SEGMENT_LABELS


def prepare_data(args: argparse.Namespace, spec: PreprocessSpec) -> SliceSet:
    """Load the data and keep what the task can use.

    Raises:
        DataError: no data, or no training or validation slices.
    """
    from trainer.loop import drop_unlabelled_masks

    column = args.label_column or "label"
    if args.label_column is None and args.labels_csv is not None:
        header = args.labels_csv.read_text().splitlines()[:1]
        if header and "label" not in header[0].split(",") and "nodule_present" in header[0]:
            column = "nodule_present"
    # Slices are loaded (and cached) one channel each, then stacked with their neighbours on
    # the whole set, before any slice is dropped, so each slice gets its real neighbours.
    data = load_data(args.data, spec.single_slice(), labels=labels_for(args.task),
                     labels_csv=args.labels_csv, label_column=column,
                     use_cache=not args.no_cache, progress=not args.no_progress)
    data.summary.log(str(args.data))
    # Each split one contiguous run, so the train/val/test subsets are views, not copies.
    data = data.grouped_by_split()
    dtype = np.dtype(getattr(args, "storage", CLASSIFY_STORAGE) if args.task == "classify"
                     else "float32")
    data = data.with_context(spec.context_slices, spec.context_spacing_mm, dtype=dtype)
    if args.task == "segment":
        data = drop_unlabelled_masks(data)
    elif not (data.labels >= 0).all():  # (a copy of every slice: only when needed)
        data = data.select(data.labels >= 0)
    for split in ("train", "val"):
        if not (data.splits == split).any():
            raise DataError(f"{args.data}: no usable {split} slices for {args.task} "
                            f"({data.summary.loaded} loaded, {len(data.summary.skipped)} skipped)")
    return data


def _lung_gate(args: argparse.Namespace, data: SliceSet) -> bool:
    """Whether the classifier gets a lung head: asked for, and lung masks to train it on
    (a DICOM folder with a label CSV and no masks trains without it)."""
    if args.task != "classify" or not args.lung_gate:
        return False
    from trainer.datasets import IGNORE

    masked = data.masks is not None and bool((~(data.masks == IGNORE).any(axis=(1, 2))).any())
    if not masked:
        log.info("classify: no lung masks, so no lung gate")
    return masked


def run(args: argparse.Namespace) -> int:
    """Train, evaluate, report, export and publish. Returns the exit code."""
    if args.task == "detect":
        from trainer.detect_train import run_detect

        return run_detect(args)
    if args.task == "segment3d":
        from trainer.train3d import run_segment3d

        return run_segment3d(args)
    import torch

    from trainer import distributed
    from trainer.augment import AugmentSpec
    from trainer.classify import ClassifyHooks
    from trainer.export_command import finish
    from trainer.loop import SegmentHooks, TrainConfig, seed_everything, train
    from trainer.models import ModelSpec, build_model

    epochs, samples, batch, lr, size, widths = DEFAULTS[args.task]
    ctx = distributed.setup(args.device)
    try:
        seed_everything(args.seed)
        context = CLASSIFY_CONTEXT if args.context_slices is None else args.context_slices
        context_mm = (CLASSIFY_CONTEXT_MM if args.context_spacing_mm is None
                      else args.context_spacing_mm or None)  # 0: the next slices
        use = args.task == "classify" and context > 0
        spec = PreprocessSpec(height=args.size or size, width=args.size or size,
                              window_center=args.window_center, window_width=args.window_width,
                              context_slices=context if use else 0,
                              context_spacing_mm=context_mm if use else None)
        data = prepare_data(args, spec)
        train_set, val_set = data.subset("train"), data.subset("val")
        labels = labels_for(args.task)
        mspec = ModelSpec(task=args.task, num_classes=len(labels),
                          widths=tuple(int(w) for w in (args.widths or widths).split(",")),
                          head_stride=args.head_stride if args.task == "classify" else 0,
                          in_channels=spec.channels,
                          stem_pool=args.stem_pool if args.task == "classify" else True,
                          flip_views=args.flip_average if args.task == "classify" else (),
                          lung_gate=_lung_gate(args, data))
        work_dir = args.work_dir or args.repo.resolve().parent / "runs" / args.model
        ema_decay = EMA_DECAY[args.task] if args.ema_decay is None else args.ema_decay
        average_last = (args.average_last if args.average_last is not None
                        else 0 if ema_decay > 0  # --ema-decay asked for: that average instead
                        else CLASSIFY_AVERAGE_LAST if args.task == "classify" else 0)
        cfg = TrainConfig(
            epochs=args.epochs or epochs, batch_size=args.batch_size or batch,
            lr=args.lr or lr, samples_per_epoch=args.samples_per_epoch or samples,
            seed=args.seed, work_dir=work_dir, resume=args.resume, amp=not args.no_amp,
            progress=not args.no_progress,
            ema_decay=ema_decay, average_last=average_last,
            snapshots=args.snapshots,
            augment=AugmentSpec(
                vflip_prob=args.vertical_flip if args.task == "classify" else 0.0,
                depth_flip_prob=args.depth_flip if args.task == "classify" else 0.0))
        hooks = (ClassifyHooks(min_visible_mm=args.min_visible_mm, crop=args.crop,
                               negatives=args.negatives, small_mm=args.small_nodule_mm,
                               small_weight=args.small_nodule_weight)
                 if args.task == "classify" else SegmentHooks(labels))
        rule = ({"min_visible_mm": args.min_visible_mm} if args.task == "classify" else {})
        meta = {"format": 1, "task": args.task, "labels": list(labels), "label_rule": rule,
                "model_spec": mspec.to_dict(), "preprocess": spec.to_dict(), "seed": args.seed,
                "epochs": cfg.epochs, "data": str(args.data),
                "data_fingerprint": data.fingerprint}
        log.info("%s: %d train / %d val / %d test slices; %d epochs x %d samples on %s",
                 args.task, len(train_set), len(val_set), int((data.splits == "test").sum()),
                 cfg.epochs, cfg.samples_per_epoch, ctx.device)
        result = train(build_model(mspec), hooks, train_set, val_set, cfg, ctx, meta)
        if ctx.is_main:
            state = torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)
            finish(state, data, repo=args.repo, name=args.model, work_dir=work_dir,
                   threshold=args.threshold, atol=args.parity_atol, rtol=args.parity_rtol,
                   max_batch_size=args.max_batch_size, train_seconds=result.seconds,
                   history=result.history)
        distributed.barrier(ctx)
    except MededgeError as exc:
        log.error("%s", exc)
        return 1
    finally:
        distributed.cleanup(ctx)
    return 0
