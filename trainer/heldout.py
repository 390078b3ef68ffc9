"""Score trainer checkpoints on an independent synthetic set, with the trainer's own metrics.

``python -m trainer.heldout {classify,detect} --data DIR CHECKPOINT [CHECKPOINT ...]``

``DIR`` is a ``mededge synth`` folder that played no part in training (for example
``mededge synth --out DIR --studies 24 --seed 1007``); every study in it is scored, whatever its
split. A checkpoint is ``best.pt`` / ``last.pt`` of a run (``PATH:KEY`` picks another state
dict in the file, e.g. ``last.pt:ema_state_dict``). The classifier is scored with
``ClassifyHooks.evaluate`` (AUC under the visible-nodule rule, ``auc_any_touch`` beside it), the
detector with ``trainer.detect_eval.evaluate`` (mAP, FROC; decoded as serving decodes). This is
how docs/training.md and docs/detection.md judge runs. One JSON line per checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from edge.core.errors import DataError
from edge.postprocess.detection import DecodeSpec
from edge.preprocess.imaging import PreprocessSpec
from trainer.datasets import CLASSIFY_LABELS, SliceSet, load_data

CLASSIFY_KEYS = ("auc", "auc_any_touch")  # threshold-free: the threshold is chosen at export
DETECT_KEYS = ("map_50", "map_50_95", "map_50_6mm", "map_50_95_6mm", "froc_cpm",
               "froc_cpm_6mm", "nodules", "nodules_6mm", "scans")


def load_checkpoint(arg: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checkpoint dict and the chosen state dict of ``PATH[:KEY]``.

    Raises:
        DataError: no such file, or no such key, or no model spec / preprocessing in it.
    """
    path, _, key = arg.partition(":")
    if not Path(path).is_file():
        raise DataError(f"{path}: no such checkpoint")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    key = key or "state_dict"
    for need in (key, "model_spec", "preprocess"):
        if need not in ck:
            raise DataError(f"{path}: no '{need}' in the checkpoint (a run made before "
                            f"checkpoints carried their spec?)")
    return ck, ck[key]


def score(task: str, ck: dict[str, Any], state: dict[str, torch.Tensor], data: Path,
          cache: dict[tuple[Any, ...], SliceSet]) -> dict[str, float]:
    """The task metrics of one state dict on every study of ``data``."""
    spec = PreprocessSpec.from_dict(ck["preprocess"])
    key = (spec.height, spec.width, spec.window_center, spec.window_width,
           spec.context_slices, spec.context_spacing_mm)
    if key not in cache:
        slices = load_data(data, spec.single_slice(), labels=CLASSIFY_LABELS, progress=False)
        cache[key] = slices.with_context(spec.context_slices, spec.context_spacing_mm)
    slices = cache[key]
    if task == "classify":
        from trainer.classify import ClassifyHooks
        from trainer.models import ModelSpec, build_model, predict

        model = build_model(ModelSpec.from_dict(ck["model_spec"]))
        model.load_state_dict(state)
        rule = float(ck.get("label_rule", {}).get("min_visible_mm", 3.0))
        m = ClassifyHooks(min_visible_mm=rule).evaluate(
            predict(model, slices.images, torch.device("cpu")), slices)
        return {k: round(float(m[k]), 4) for k in CLASSIFY_KEYS if k in m}
    from trainer.detect import attach_boxes
    from trainer.detect_eval import evaluate, predict_heads
    from trainer.models_detect import STRIDE, DetectorSpec, build_detector

    coco = data / "labels" / "boxes_coco.json"
    manifest = json.loads((data / "manifest.json").read_text())
    dset = attach_boxes(slices, coco, spec, tuple(ck.get("labels", ("nodule",))))
    detector = build_detector(DetectorSpec.from_dict(ck["model_spec"]))
    detector.load_state_dict(state)
    detector.eval()
    m, _, _ = evaluate(predict_heads(detector, dset.slices.images), dset, coco, spec,
                       DecodeSpec(stride=STRIDE), manifest)
    return {k: round(float(m[k]), 4) for k in DETECT_KEYS if k in m}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.heldout", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("task", choices=("classify", "detect"))
    parser.add_argument("--data", type=Path, required=True, help="a mededge synth folder")
    parser.add_argument("checkpoints", nargs="+", help="best.pt, last.pt or PATH:KEY")
    args = parser.parse_args(argv)
    if not (args.data / "manifest.json").is_file():
        print(f"error: {args.data}: no manifest.json (not a mededge synth folder)",
              file=sys.stderr)
        return 2
    cache: dict[tuple[Any, ...], SliceSet] = {}
    try:
        for arg in args.checkpoints:
            ck, state = load_checkpoint(arg)
            result = score(args.task, ck, state, args.data, cache)
            print(json.dumps({"checkpoint": arg, "data": str(args.data), **result}), flush=True)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
