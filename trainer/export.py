"""ONNX export, the ONNX Runtime vs torch parity check, and publishing into a model repository.

The graph is exported with the TorchScript exporter (``dynamo=False``): torch 2.13's dynamo
exporter could not produce opset 17 for a ResNet here. Input ``image`` [N, 1, H, W] float32,
output ``logits`` ([N, C] or [N, C, H, W]), batch axis dynamic. Softmax is left to serving,
as the sidecar's ``postprocess.activation`` says.
"""

from __future__ import annotations

import datetime as dt
import logging
import platform
import subprocess
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge.core.errors import ExportError
from edge.core.types import Task
from edge.preprocess.imaging import PreprocessSpec
from edge.protos import model_config_pb2 as mc
from edge.repository.model_config import ModelConfig
from edge.repository.publish import publish_version
from edge.repository.sidecar import Applicability, Sidecar
from trainer.models import parameter_bytes

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "image", "logits"
ONNX_FILE, EXTERNAL_DATA_FILE = "model.onnx", "model.onnx.data"
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB limit, with headroom


@dataclass(frozen=True)
class ParityReport:
    """How far ONNX Runtime's outputs are from torch's on the same inputs."""

    samples: int
    max_abs_diff: float
    max_rel_diff: float
    atol: float
    rtol: float

    def as_dict(self) -> dict[str, float]:
        return {"samples": self.samples, "max_abs_diff": self.max_abs_diff,
                "max_rel_diff": self.max_rel_diff, "atol": self.atol, "rtol": self.rtol}


def export_onnx(model: torch.nn.Module, example: np.ndarray, out_dir: Path, *, opset: int = 17,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict[str, Path]:
    """Export ``model`` (eval mode) to ``out_dir/model.onnx``; returns file name -> path.

    Models whose weights reach ``external_data_threshold`` bytes are saved with their tensors
    in ``model.onnx.data`` beside the graph (ONNX's external-data format).

    Raises:
        ExportError: the exporter fails or ``opset`` < 17.
    """
    import onnx

    if opset < 17:
        raise ExportError(f"opset {opset} < 17 is not supported")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    x = torch.from_numpy(np.ascontiguousarray(example[:1], dtype=np.float32))
    target = out_dir / ONNX_FILE
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        raw = Path(tmp) / ONNX_FILE
        try:
            with warnings.catch_warnings():
                # The TorchScript exporter is chosen on purpose (see module doc); its
                # deprecation warnings would only be noise here.
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(
                    model, (x,), str(raw), dynamo=False, opset_version=opset,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    do_constant_folding=True)
            proto = onnx.load(str(raw))
            onnx.checker.check_model(proto, full_check=True)
        except Exception as exc:  # the exporter raises many types
            raise ExportError(f"ONNX export failed: {exc}") from exc
        files = {ONNX_FILE: target}
        if parameter_bytes(model) >= external_data_threshold:
            onnx.save_model(proto, str(target), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=EXTERNAL_DATA_FILE,
                            size_threshold=1024)
            files[EXTERNAL_DATA_FILE] = out_dir / EXTERNAL_DATA_FILE
        else:
            onnx.save_model(proto, str(target))
    return files


def check_parity(onnx_path: Path, model: torch.nn.Module, samples: np.ndarray, *,
                 atol: float = 1e-4, rtol: float = 1e-4) -> ParityReport:
    """Compare ONNX Runtime (CPU) with torch on ``samples``, all at once and one by one.

    Passes when ``|onnx - torch| <= atol + rtol * |torch|`` everywhere.

    Raises:
        ExportError: outputs differ beyond tolerance, or ONNX Runtime cannot run the model.
    """
    import onnxruntime as ort

    x = np.ascontiguousarray(samples, dtype=np.float32)
    model = model.cpu().eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        batched = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        single = np.concatenate([sess.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + 1]})[0]
                                 for i in range(min(len(x), 4))])
    except Exception as exc:  # onnxruntime raises its own types
        raise ExportError(f"{onnx_path}: ONNX Runtime cannot run the model: {exc}") from exc
    if batched.shape != ref.shape:
        raise ExportError(f"{onnx_path}: output shape {batched.shape} != torch {ref.shape}")
    diffs = [np.abs(batched - ref), np.abs(single - ref[:len(single)])]
    max_abs = float(max(d.max() for d in diffs))
    rel = max(float((d / np.maximum(np.abs(ref[:len(d)]), 1e-12)).max()) for d in diffs)
    report = ParityReport(len(x), max_abs, rel, atol, rtol)
    bad = [int(np.sum(d > atol + rtol * np.abs(ref[:len(d)]))) for d in diffs]
    if sum(bad) or not np.isfinite(max_abs):
        raise ExportError(
            f"{onnx_path}: ONNX Runtime and torch disagree on {sum(bad)} values: max abs diff "
            f"{max_abs:.3g}, max rel diff {rel:.3g} (tolerance atol {atol:g}, rtol {rtol:g})")
    return report


def triton_config(name: str, input_shape: Sequence[int], output_shape: Sequence[int], *,
                  max_batch_size: int = 8, queue_delay_us: int = 500) -> ModelConfig:
    """``config.pbtxt`` for ONNX Runtime on CPU; shapes exclude the batch axis."""
    cfg = ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=max_batch_size,
                      default_model_filename=ONNX_FILE)
    cfg.input.add(name=INPUT_NAME, data_type=mc.TYPE_FP32, dims=list(input_shape),
                  format=mc.ModelInput.FORMAT_NCHW)
    cfg.output.add(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=list(output_shape))
    preferred = sorted({b for b in (max(1, max_batch_size // 2), max_batch_size) if b > 1})
    cfg.dynamic_batching.preferred_batch_size.extend(preferred)
    cfg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    return cfg


def git_commit(where: Path | None = None) -> str:
    """``git rev-parse HEAD`` of the source tree, or ``"unknown"`` outside a checkout."""
    cwd = where or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(*, fingerprint: str, seed: int, epochs: int, extra: Mapping[str, Any] = {}
               ) -> dict[str, Any]:
    """The provenance block of the sidecar: data, code, library versions, run settings."""
    import monai

    return {"data_fingerprint": fingerprint, "git_commit": git_commit(),
            "torch": str(torch.__version__), "monai": str(monai.__version__),
            "python": platform.python_version(), "seed": seed, "epochs": epochs,
            "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **dict(extra)}


def make_sidecar(task: Task, labels: Sequence[str], spec: PreprocessSpec, *,
                 thresholds: Mapping[str, float], prov: Mapping[str, Any]) -> Sidecar:
    """The model-level sidecar for a chest CT model."""
    post: dict[str, Any] = {"activation": "softmax", "output": OUTPUT_NAME}
    if task is Task.SEGMENT:
        post["argmax"] = True
    return Sidecar(task=task, labels=tuple(labels), preprocess=spec,
                   applicability=Applicability(modality=("CT",), body_part=("CHEST",)),
                   thresholds=dict(thresholds), postprocess=post, provenance=dict(prov))


def export_and_publish(model: torch.nn.Module, samples: np.ndarray, repo: Path, name: str,
                       sidecar: Sidecar, *, metrics: Mapping[str, float],
                       report: Mapping[str, Any], work_dir: Path, atol: float = 1e-4,
                       rtol: float = 1e-4, max_batch_size: int = 8,
                       external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
                       ) -> tuple[int, ParityReport]:
    """Export, check parity on ``samples`` (real preprocessed inputs), then publish a version.

    Returns the version number and the parity report. Nothing is published when parity fails.

    Raises:
        ExportError: export or parity failed.
        RepositoryError: publishing failed.
    """
    files = export_onnx(model, samples, work_dir / "onnx",
                        external_data_threshold=external_data_threshold)
    parity = check_parity(files[ONNX_FILE], model, samples, atol=atol, rtol=rtol)
    log.info("parity ok on %d samples: max abs diff %.3g", parity.samples, parity.max_abs_diff)
    with torch.no_grad():
        out_shape = model(torch.from_numpy(samples[:1].astype(np.float32))).shape[1:]
    config = triton_config(name, samples.shape[1:], tuple(out_shape),
                           max_batch_size=max_batch_size)
    version = publish_version(repo, name, files, config, sidecar, metrics=metrics,
                              report={**report, "parity": parity.as_dict()})
    return version, parity
