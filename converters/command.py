"""``mededge convert``: optimise / FP16 / INT8 / TensorRT a published version, gate, publish.

Steps: resolve the source version -> convert in a work folder -> evaluate the result against
its FP32 reference on held-out data (the accuracy gate) -> publish a new version with the
manifest and the gate report in its sidecar record. A failed gate publishes nothing and exits
1 with the drop in the message; a usage or data problem exits 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge.core.errors import MededgeError
from edge.core.types import Task

log = logging.getLogger(__name__)

TARGETS = ("onnx-opt", "fp16", "int8", "tensorrt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, required=True, help="model repository")
    parser.add_argument("--model", required=True, help="model name in the repository")
    parser.add_argument("--to", required=True, choices=TARGETS, help="what to produce")
    parser.add_argument("--version", type=int, help="source version (default: newest ONNX)")
    parser.add_argument("--data", type=Path,
                        help="held-out data for the gate: a synthetic folder, DICOM + labels.csv "
                             "or .npz (default: the training data named in the sidecar)")
    parser.add_argument("--eval-split", default="test", help="split of --data to evaluate on")
    parser.add_argument("--eval-samples", type=int, help="at most this many held-out samples")
    parser.add_argument("--coco", type=Path,
                        help="a detector's held-out boxes (COCO JSON) for a labelled DICOM "
                             "folder; a synthetic folder has its own")
    parser.add_argument("--calibration-data", type=Path,
                        help="INT8 calibration: synthetic folder, DICOM folder, .npy/.npz "
                             "(default: --data)")
    parser.add_argument("--calibration-split", default="train",
                        help="split of --calibration-data (ignored when it has none)")
    parser.add_argument("--calibration-method", default="minmax",
                        choices=("minmax", "entropy", "percentile"))
    parser.add_argument("--samples", type=int, default=256, help="calibration samples")
    parser.add_argument("--activation-type", choices=("int8", "uint8"),
                        help="default uint8 (fastest on ONNX Runtime CPU); int8 with --symmetric")
    parser.add_argument("--weight-type", default="int8", choices=("int8", "uint8"))
    parser.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales")
    parser.add_argument("--symmetric", action="store_true",
                        help="symmetric activation ranges (what TensorRT wants)")
    parser.add_argument("--exclude-nodes", nargs="*", default=[],
                        help="node names kept in FP32 (fp16, int8)")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="largest allowed drop of the task metric (AUC, Dice)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"),
                        help="TensorRT precision (default fp16; int8 for a QDQ source)")
    parser.add_argument("--max-batch", type=int, help="TensorRT profile max batch "
                        "(default: config max_batch_size)")
    parser.add_argument("--workspace-mb", type=int, default=2048, help="TensorRT workspace")
    parser.add_argument("--dla-core", type=int, help="Jetson DLA core (GPU fallback on)")
    parser.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file (kept)")
    parser.add_argument("--batch-size", type=int, default=8, help="evaluation batch size")
    parser.add_argument("--work-dir", type=Path, help="keep intermediate files here")


def _fp32_reference(source: Any) -> Path:
    """The FP32 ancestor's ONNX: follow ``report.conversion.source_version`` back."""
    model_dir = source.repo / source.name
    version, seen = source.version, set()
    while version not in seen:
        seen.add(version)
        record = source.sidecar.versions.get(version)
        conversion = (record.report.get("conversion") or {}) if record else {}
        if record is None or record.precision == "fp32" or "source_version" not in conversion:
            break
        version = int(conversion["source_version"])
    return model_dir / str(version) / "model.onnx"


def _convert(args: argparse.Namespace, source: Any, work: Path
             ) -> tuple[dict[str, Path], str, dict[str, Any], str | None, Any]:
    """Run the step; returns (files, precision, details, calibration fingerprint, candidate)."""
    from converters import calibration

    spec = source.sidecar.preprocess
    if args.to == "onnx-opt":
        from converters.optimize import optimize_onnx

        out = optimize_onnx(source.onnx_path, work / "model.onnx")
        return {"model.onnx": out}, source.precision, {"level": "basic"}, None, out
    if args.to == "fp16":
        from converters.fp16 import convert_fp16

        out = convert_fp16(source.onnx_path, work / "model.onnx",
                           exclude_nodes=args.exclude_nodes)
        return {"model.onnx": out}, "fp16", {"keep_io_types": True,
                                             "exclude_nodes": args.exclude_nodes}, None, out
    if args.to == "int8":
        from converters.int8 import Int8Options, quantize_int8

        cal_path = args.calibration_data or args.data
        if cal_path is None:
            raise MededgeError("int8 needs --calibration-data (or --data)")
        cal = calibration.load_samples(cal_path, spec, split=_split_of(cal_path,
                                                                       args.calibration_split),
                                       labels=source.sidecar.labels, limit=args.samples)
        options = Int8Options(method=args.calibration_method, per_channel=not args.per_tensor,
                              activation_type=args.activation_type or (
                                  "int8" if args.symmetric else "uint8"),
                              weight_type=args.weight_type, symmetric_activations=args.symmetric,
                              exclude_nodes=tuple(args.exclude_nodes))
        out = work / "model.onnx"
        details = quantize_int8(source.onnx_path, out, cal.images, options)
        details["calibration_data"] = cal.source
        return {"model.onnx": out}, "int8", details, cal.fingerprint, out
    from converters.tensorrt import EngineRequest, build_engine_for

    precision = args.precision or ("int8" if source.precision == "int8" else "fp16")
    request = EngineRequest(precision=precision,
                            max_batch=args.max_batch or max(1, source.config.max_batch_size),
                            workspace_mb=args.workspace_mb, dla_core=args.dla_core,
                            timing_cache=args.timing_cache)
    plan, engine = build_engine_for(source.onnx_path, request, work)
    return ({"model.plan": plan, "model.onnx": source.onnx_path, "model.plan.json":
             plan.with_name("model.plan.json")}, precision, {"engine": engine}, None, plan)


def _split_of(path: Path, split: str) -> str | None:
    """The split to take from ``path``: only synthetic / labelled folders have splits."""
    return split if path.is_dir() and ((path / "manifest.json").is_file()
                                       or (path / "labels.csv").is_file()) else None


def _candidate_runner(args: argparse.Namespace, candidate: Path,
                      source: Any) -> tuple[Callable[..., Any], Callable[[], None]]:
    from converters.evaluate import onnx_runner

    heads = source.sidecar.task is Task.DETECT  # every output, by name
    if args.to == "tensorrt":
        from converters.tensorrt import engine_runner

        run, backend = engine_runner(candidate, source.config.max_batch_size > 0,
                                     all_outputs=heads)
        return run, backend.close
    return onnx_runner(str(candidate), all_outputs=heads), lambda: None


def convert(args: argparse.Namespace, work: Path) -> int:
    """Convert, gate and publish; returns the new version number.

    Raises:
        GateError: the gate failed (nothing published).
        MededgeError: any other problem (source, data, conversion, publishing).
    """
    from converters import calibration
    from converters.evaluate import onnx_runner
    from converters.gate import enforce, evaluate_gate
    from converters.manifest import conversion_manifest, publish_converted, resolve_source

    source = resolve_source(args.repo, args.model, args.version)
    data = args.data
    if data is None and source.sidecar.provenance.get("data"):
        data = Path(str(source.sidecar.provenance["data"]))
    if data is None:
        raise MededgeError("the accuracy gate needs held-out data: --data DIR")
    task = source.sidecar.task
    held_out = calibration.load_samples(data, source.sidecar.preprocess,
                                        split=_split_of(data, args.eval_split),
                                        labels=source.sidecar.labels, limit=args.eval_samples,
                                        task=task, coco=args.coco)
    files, precision, details, cal_fp, candidate = _convert(args, source, work)
    run, close = _candidate_runner(args, candidate, source)
    try:
        batch = args.batch_size if args.to != "tensorrt" else \
            min(args.batch_size, args.max_batch or max(1, source.config.max_batch_size))
        report = evaluate_gate(task, source.sidecar.labels,
                               onnx_runner(str(_fp32_reference(source)),
                                           all_outputs=task is Task.DETECT),
                               run, held_out, args.tolerance, batch, source.sidecar.postprocess)
    finally:
        close()
    what = f"{args.model}:{source.version} -> {args.to} ({precision})"
    enforce(report, what)
    engine = details.pop("engine", None)
    manifest = conversion_manifest(source, target=args.to, precision=precision, details=details,
                                   calibration_fingerprint=cal_fp, engine=engine)
    version = publish_converted(
        source, files, precision=precision, metrics={report.metric: report.candidate},
        report={"gate": report.as_dict(), "conversion": manifest},
        platform_name="tensorrt_plan" if args.to == "tensorrt" else None)
    print(report.message(what))
    print(f"published {args.model}:{version} ({precision}) in {args.repo}")
    return version


def run(args: argparse.Namespace) -> int:
    from converters.gate import GateError

    try:
        if args.work_dir is not None:
            args.work_dir.mkdir(parents=True, exist_ok=True)
            convert(args, args.work_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="mededge-convert-") as tmp:
                convert(args, Path(tmp))
    except GateError as exc:
        print(f"mededge convert: {exc}; nothing was published", file=sys.stderr)
        return 1
    except (MededgeError, ValueError) as exc:
        print(f"mededge convert: {exc}", file=sys.stderr)
        return 2
    return 0
