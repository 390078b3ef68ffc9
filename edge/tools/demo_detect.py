"""The demo's detection and heatmap step: ``python -m edge.tools.demo_detect --data DIR --repo
REPO --out DIR [--detector NAME] [--classifier NAME]``.

On the first held-out synthetic study with a nodule of 6 mm or more: the detector runs on every
slice (ONNX Runtime, decoded with the sidecar's settings, merged in 3D as the pipeline does);
the nodules are printed with the ground truth beside them; ``detections.png`` shows the boxes
on the slice of the largest nodule (green: ground truth, red: detections with scores); the
classifier's ``cam`` output on that slice becomes ``cam_overlay.png`` and the DICOM Secondary
Capture ``cam_sc.dcm`` a PACS can show.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom

from edge.core.types import ModelId
from edge.postprocess.nodules3d import detect_series
from edge.postprocess.results import SliceDetection, VoxelSpacing
from edge.postprocess.slice_boxes import decode_frame, merge_spec, rows_to_boxes
from edge.preprocess.dicom_pixels import decode
from edge.preprocess.imaging import apply_window, to_modality_units
from edge.preprocess.series_input import series_inputs
from edge.preprocess.volume import frame_geometries
from edge.repository.loader import read_model
from edge.repository.sidecar import read_sidecar
from edge.writers.cam import build_cam_sc, cam_to_frame, overlay_rgb
from edge.writers.codes import AlgorithmInfo


def _session(repo: Path, name: str) -> tuple[object, int]:
    import onnxruntime as ort

    source = read_model(repo, name).versions[-1]
    return (ort.InferenceSession(str(source.model_path), providers=["CPUExecutionProvider"]),
            source.model_id.version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge.tools.demo_detect")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--detector", default="nodule_det")
    parser.add_argument("--classifier", default="nodule_cls")
    args = parser.parse_args(argv)
    studies = json.loads((args.data / "manifest.json").read_text())["studies"]
    held = [s for s in studies if s["split"] == "test"] or studies
    study = next((s for s in held if any(n["diameter_mm"] >= 6 for n in s["nodules"])), None)
    if study is None:
        print("demo: no held-out study with a nodule >= 6 mm")
        return 1
    ct = study["ct"]
    datasets = [pydicom.dcmread(args.data / ct["dir"] / f) for f in ct["files"]]
    sidecar = read_sidecar(args.repo / args.detector)
    assert sidecar is not None
    sess, version = _session(args.repo, args.detector)
    slices = []
    inputs = series_inputs(datasets, sidecar.preprocess)  # 2.5D: stacked as serving does
    for ds, x in zip(datasets, inputs, strict=True):
        decoded = decode(ds, str(ds.SOPInstanceUID))
        x = x[np.newaxis]
        names = ["heatmap", "size", "offset"]
        heads = dict(zip(names, sess.run(names, {"image": x}), strict=True))  # type: ignore
        rows = decode_frame(heads, sidecar.labels, decoded.frames[0].shape[:2],
                            sidecar.preprocess, sidecar.thresholds, sidecar.postprocess)
        slices.append(SliceDetection(str(ds.SOPInstanceUID), rows_to_boxes(rows,
                                                                            sidecar.labels)))
    spacing = VoxelSpacing(*ct["pixel_spacing"], ct.get("slice_spacing", ct["slice_thickness"]))
    frames = [f for ds in datasets for f in frame_geometries(ds)]
    result = detect_series(ModelId(args.detector, version), sidecar.labels, slices, spacing,
                           frames, merge_spec(sidecar.postprocess))
    print(f"{study['study_id']}: {len(result.candidates)} nodule(s) found "
          f"(threshold {sidecar.thresholds}):")
    for c in result.candidates:
        z, y, x = c.center_voxel
        print(f"  found  centre (z {z:5.1f}, y {y:6.1f}, x {x:6.1f})  {c.diameter_mm:5.1f} mm  "
              f"p={c.score:.2f}")
    for n in study["nodules"]:
        z, y, x = n["center_voxel"]
        print(f"  truth  centre (z {z:5.1f}, y {y:6.1f}, x {x:6.1f})  {n['diameter_mm']:5.1f} mm")
    big = max(study["nodules"], key=lambda n: n["diameter_mm"])
    k = int(round(big["center_voxel"][0]))
    ds = datasets[k]
    decoded = decode(ds, str(ds.SOPInstanceUID))
    gray = apply_window(to_modality_units(decoded.frames[0], decoded.meta), -600.0, 1500.0)
    image = cv2.cvtColor((gray * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    for n in study["nodules"]:
        if str(k) in n["boxes"]:
            x, y, w, h = n["boxes"][str(k)]
            cv2.rectangle(image, (int(x) - 1, int(y) - 1), (int(x + w), int(y + h)),
                          (0, 200, 0), 1)
    for b in slices[k].boxes:
        cv2.rectangle(image, (int(b.x0), int(b.y0)), (int(b.x1), int(b.y1)), (0, 0, 255), 1)
        cv2.putText(image, f"{b.score:.2f}", (int(b.x0), max(10, int(b.y0) - 3)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 255), 1, cv2.LINE_AA)
    args.out.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out / "detections.png"), image)
    print(f"  {args.out / 'detections.png'}: slice {k} (green truth, red detections)")
    cls_sidecar = read_sidecar(args.repo / args.classifier)
    if cls_sidecar is None or "cam" not in cls_sidecar.postprocess:
        print(f"  no CAM: {args.classifier} has no 'cam' output")
        return 0
    cls_sess, cls_version = _session(args.repo, args.classifier)
    x = series_inputs(datasets, cls_sidecar.preprocess)[k][np.newaxis]
    outputs = ["logits", str(cls_sidecar.postprocess["cam"])]
    logits, cam = cls_sess.run(outputs, {"image": x})  # type: ignore[attr-defined]
    p = float(np.exp(logits[0, 1]) / np.exp(logits[0]).sum())
    heat = cam_to_frame(cam[0, 0], gray.shape, cls_sidecar.preprocess)
    rgb = overlay_rgb(gray, heat, legend=f"AI CAM (derived) p={p:.2f}")
    cv2.imwrite(str(args.out / "cam_overlay.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    model = ModelId(args.classifier, cls_version)
    sc = build_cam_sc(ds, cam[0, 0], cls_sidecar.preprocess, model,
                      AlgorithmInfo(args.classifier, str(cls_version)), p)
    sc.save_as(args.out / "cam_sc.dcm", enforce_file_format=True)
    print(f"  {args.out / 'cam_overlay.png'} and {args.out / 'cam_sc.dcm'}: CAM of "
          f"{args.classifier} on slice {k}, p(nodule)={p:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
