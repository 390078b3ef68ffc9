"""``mededge infer --url HOST:PORT --model NAME FILE``: one inference over gRPC (tritonclient).

FILE is a ``.npy`` array (sent as is, a batch axis added when missing) or a DICOM file, which is
preprocessed exactly as the server's DICOM pipeline does it (``edge.preprocess``). The recipe
comes from the model's sidecar: from ``--repo`` when given, else from the server, which
publishes it in the ModelConfig response as the parameter ``mededge.sidecar`` (JSON). Prints
probabilities with labels for classifiers, per-label pixel counts for segmenters, and summary
statistics otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

SIDECAR_PARAMETER = "mededge.sidecar"  # the same key edge.api.inference_service sets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="127.0.0.1:8001", help="gRPC HOST:PORT")
    parser.add_argument("--model", required=True, help="model name")
    parser.add_argument("--version", default="", help="model version (default: latest)")
    parser.add_argument("--repo", type=Path,
                        help="model repository to read the sidecar from (else: the server)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds")
    parser.add_argument("file", type=Path, help="a .dcm file or a .npy array")


def _sidecar(args: argparse.Namespace, client: Any) -> dict[str, Any] | None:
    if args.repo is not None:
        from edge.repository.sidecar import read_sidecar

        sidecar = read_sidecar(args.repo / args.model)
        if sidecar is None:
            return None
        return {"task": sidecar.task.value, "labels": list(sidecar.labels),
                "preprocess": sidecar.preprocess.to_dict(),
                "postprocess": dict(sidecar.postprocess)}
    config = client.get_model_config(args.model, args.version).config
    if SIDECAR_PARAMETER not in config.parameters:
        return None
    return json.loads(config.parameters[SIDECAR_PARAMETER].string_value)


def _dicom_input(path: Path, sidecar: dict[str, Any] | None) -> np.ndarray:
    from edge.preprocess.dicom_pixels import read_image
    from edge.preprocess.imaging import PreprocessSpec, preprocess_image

    if sidecar is None:
        raise SystemExit("mededge infer: the model has no sidecar with a preprocessing recipe; "
                         "pass --repo or send a .npy")
    spec = PreprocessSpec.from_dict(sidecar["preprocess"])
    if spec.context_slices:  # 2.5D: the file's series neighbours from the same folder
        return _context_input(path, spec)
    image = read_image(path)
    return preprocess_image(image.frames[0], image.meta, spec)[np.newaxis]  # (1, 1, H, W)


def _context_input(path: Path, spec: Any) -> np.ndarray:
    """(1, 2k + 1, H, W): ``path`` stacked with the instances of its series found in its
    folder, as the pipeline stacks a series (edge.preprocess.series_input)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from edge.preprocess.series_input import series_inputs

    target = pydicom.dcmread(path)
    series = []
    for sibling in sorted(path.parent.iterdir()):
        if not sibling.is_file():
            continue
        try:
            head = pydicom.dcmread(sibling, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):  # not DICOM: not its series
            continue
        if getattr(head, "SeriesInstanceUID", None) == target.SeriesInstanceUID \
                and head.SOPInstanceUID != target.SOPInstanceUID:
            series.append(pydicom.dcmread(sibling))
    print(f"2.5D model: {path.name} stacked with {len(series)} instance(s) of its series "
          f"from {path.parent}", file=sys.stderr)
    return series_inputs([target, *series], spec)[:1]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def describe(output: np.ndarray, sidecar: dict[str, Any] | None, name: str = "") -> str:
    """A human-readable summary of the first item of a model output. Only the output the
    sidecar's postprocess names (``output``; any, when it names none) is read as the task's
    answer; others (a class-activation map, detector heads) get their shape and range."""
    item = output[0]
    task = (sidecar or {}).get("task")
    answer = ((sidecar or {}).get("postprocess") or {}).get("output")
    if answer and name and name != answer:
        task = None
    labels = list((sidecar or {}).get("labels") or [])
    if task == "classify":
        flat = item.reshape(-1).astype(np.float64)
        in_unit = bool(((flat >= 0) & (flat <= 1)).all())
        if flat.size == 1:
            probs = flat if in_unit else 1 / (1 + np.exp(-flat))
        else:
            probs = flat if in_unit and abs(flat.sum() - 1) < 1e-3 else _softmax(flat)
        names = labels if len(labels) == probs.size else [f"class {i}" for i in range(probs.size)]
        return "\n".join(f"  {name}: {p:.4f}" for name, p in zip(names, probs, strict=True))
    if task == "segment":
        if item.ndim == 3 and item.shape[0] > 1:
            classes = item.argmax(axis=0)
        else:
            plane = item.reshape(item.shape[-2:])
            probs = plane if ((plane >= 0) & (plane <= 1)).all() else 1 / (1 + np.exp(-plane))
            classes = (probs > 0.5).astype(np.int64)
        total = classes.size
        rows = []
        for index in range(int(classes.max()) + 1 if total else 0):
            count = int((classes == index).sum())
            name = labels[index] if index < len(labels) else f"class {index}"
            rows.append(f"  {name}: {count} px ({count / total:.1%})")
        return "\n".join(rows)
    return (f"  shape {list(output.shape)} min {output.min():.4g} max {output.max():.4g} "
            f"mean {output.mean():.4g}")


def run(args: argparse.Namespace) -> int:
    from edge.tools.triton_client import grpcclient

    client_mod = grpcclient()
    client = client_mod.InferenceServerClient(args.url)
    try:
        meta = client.get_model_metadata(args.model, args.version, as_json=True)
        if len(meta["inputs"]) != 1:
            print(f"mededge infer: {args.model} takes {len(meta['inputs'])} inputs; "
                  "only single-input models are supported", file=sys.stderr)
            return 2
        spec = meta["inputs"][0]
        sidecar = _sidecar(args, client)
        if args.file.suffix.lower() == ".npy":
            array = np.load(args.file)
            if array.ndim == len(spec["shape"]) - 1:
                array = array[np.newaxis]
        else:
            array = _dicom_input(args.file, sidecar)
        from edge.core.types import KSERVE_TO_NUMPY

        array = np.ascontiguousarray(array, dtype=KSERVE_TO_NUMPY[spec["datatype"]])
        inp = client_mod.InferInput(spec["name"], list(array.shape), spec["datatype"])
        inp.set_data_from_numpy(array)
        result = client.infer(args.model, [inp], model_version=args.version,
                              client_timeout=args.timeout)
    except client_mod.InferenceServerException as exc:
        print(f"mededge infer: {exc.status()}: {exc.message()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    for output in meta["outputs"]:
        values = result.as_numpy(output["name"])
        print(f"{output['name']} {list(values.shape)}:")
        print(describe(values, sidecar, output["name"]))
    return 0
