"""ONNX export, parity check and publishing of models with several named outputs.

The detector (``heatmap``, ``size``, ``offset``) and the classifier with its class-activation
map (``logits``, ``cam``) have more than the one ``logits`` output :mod:`trainer.export` knows.
Same conventions: TorchScript exporter (``dynamo=False``, opset 17), input ``image``, batch axis
dynamic, parity with ONNX Runtime on real inputs before anything is published.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge.core.errors import ExportError
from edge.protos import model_config_pb2 as mc
from edge.repository.model_config import ModelConfig
from edge.repository.publish import publish_version
from edge.repository.sidecar import Sidecar
from trainer.export import INPUT_NAME, ONNX_FILE, ParityReport


def _outputs(model: torch.nn.Module, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]


def export_multi(model: torch.nn.Module, example: np.ndarray, out_dir: Path,
                 output_names: Sequence[str], *, opset: int = 17) -> Path:
    """Export ``model`` (eval mode, returning a tuple in ``output_names`` order) to
    ``out_dir/model.onnx``.

    Raises:
        ExportError: the exporter or the ONNX checker fails.
    """
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    x = torch.from_numpy(np.ascontiguousarray(example[:1], dtype=np.float32))
    target = out_dir / ONNX_FILE
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *output_names)}
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        raw = Path(tmp) / ONNX_FILE
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(model, (x,), str(raw), dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=list(output_names),
                                  dynamic_axes=axes, do_constant_folding=True)
            proto = onnx.load(str(raw))
            onnx.checker.check_model(proto, full_check=True)
        except Exception as exc:  # the exporter raises many types
            raise ExportError(f"ONNX export failed: {exc}") from exc
        onnx.save_model(proto, str(target))
    return target


def check_parity_multi(onnx_path: Path, model: torch.nn.Module, samples: np.ndarray,
                       output_names: Sequence[str], *, atol: float = 1e-4,
                       rtol: float = 1e-4) -> ParityReport:
    """ONNX Runtime (CPU) against torch on every output, batched and one sample at a time.

    Raises:
        ExportError: any output differs beyond ``atol + rtol * |torch|``, or ORT cannot run it.
    """
    import onnxruntime as ort

    x = np.ascontiguousarray(samples, dtype=np.float32)
    refs = _outputs(model.cpu().eval(), x)
    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        batched = sess.run(list(output_names), {INPUT_NAME: x})
        singles = [sess.run(list(output_names), {INPUT_NAME: x[i:i + 1]})
                   for i in range(min(len(x), 4))]
    except Exception as exc:  # onnxruntime raises its own types
        raise ExportError(f"{onnx_path}: ONNX Runtime cannot run the model: {exc}") from exc
    max_abs, max_rel, bad = 0.0, 0.0, 0
    for k, name in enumerate(output_names):
        ref = refs[k]
        single = np.concatenate([s[k] for s in singles])
        if batched[k].shape != ref.shape:
            raise ExportError(f"{onnx_path}: output {name} shape {batched[k].shape} != torch "
                              f"{ref.shape}")
        for got, want in ((batched[k], ref), (single, ref[:len(single)])):
            diff = np.abs(got - want)
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float((diff / np.maximum(np.abs(want), 1e-12)).max()))
            bad += int(np.sum(~(diff <= atol + rtol * np.abs(want))))
    if bad:
        raise ExportError(f"{onnx_path}: ONNX Runtime and torch disagree on {bad} values: max "
                          f"abs diff {max_abs:.3g} (atol {atol:g}, rtol {rtol:g})")
    return ParityReport(len(x), max_abs, max_rel, atol, rtol)


def triton_config_multi(name: str, input_shape: Sequence[int],
                        outputs: Mapping[str, Sequence[int]], *, max_batch_size: int = 8,
                        queue_delay_us: int = 500) -> ModelConfig:
    """``config.pbtxt`` for ONNX Runtime on CPU with several outputs (shapes without batch)."""
    cfg = ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=max_batch_size,
                      default_model_filename=ONNX_FILE)
    cfg.input.add(name=INPUT_NAME, data_type=mc.TYPE_FP32, dims=list(input_shape),
                  format=mc.ModelInput.FORMAT_NCHW)
    for out_name, shape in outputs.items():
        cfg.output.add(name=out_name, data_type=mc.TYPE_FP32, dims=list(shape))
    preferred = sorted({b for b in (max(1, max_batch_size // 2), max_batch_size) if b > 1})
    cfg.dynamic_batching.preferred_batch_size.extend(preferred)
    cfg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    return cfg


def publish_multi(model: torch.nn.Module, samples: np.ndarray, repo: Path, name: str,
                  sidecar: Sidecar, output_names: Sequence[str], *,
                  metrics: Mapping[str, float], report: Mapping[str, Any], work_dir: Path,
                  atol: float = 1e-4, rtol: float = 1e-4, max_batch_size: int = 8
                  ) -> tuple[int, ParityReport]:
    """Export, check parity on ``samples``, publish a new version; nothing is published when
    parity fails.

    Raises:
        ExportError: export or parity failed.
        RepositoryError: publishing failed.
    """
    path = export_multi(model, samples, work_dir / "onnx", output_names)
    parity = check_parity_multi(path, model, samples, output_names, atol=atol, rtol=rtol)
    shapes = {n: o.shape[1:] for n, o in zip(output_names, _outputs(model, samples[:1]),
                                             strict=True)}
    config = triton_config_multi(name, samples.shape[1:], shapes, max_batch_size=max_batch_size)
    version = publish_version(repo, name, {ONNX_FILE: path}, config, sidecar, metrics=metrics,
                              report={**report, "parity": parity.as_dict()})
    return version, parity
