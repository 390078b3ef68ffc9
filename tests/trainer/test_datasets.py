"""Datasets on a tiny synthetic folder: synthetic loader, user DICOM folder + CSV with a corrupt
file, NIfTI and DICOM SEG masks, COCO boxes."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from edge.core.errors import DataError
from edge.preprocess.context import stack_context
from edge.preprocess.dicom_pixels import decode
from edge.preprocess.imaging import PreprocessSpec, preprocess_image
from edge.preprocess.volume import frame_geometries, slice_order
from trainer.datasets import SEGMENT_LABELS, load_coco, load_dicom_folder, load_synthetic
from trainer.datasets.masks import combine_lung_nodule, fit_mask, read_nifti_slices

SPEC = PreprocessSpec(height=32, width=32, window_center=-600, window_width=1500)


@pytest.fixture()
def synth(small_synth: Path) -> Path:
    return small_synth  # tests/conftest.py: made once per session, only read here


def _manifest(data: Path) -> dict:
    return json.loads((data / "manifest.json").read_text())


def test_synthetic_loader_shapes_labels_masks_and_cache(synth: Path) -> None:
    manifest = _manifest(synth)
    n = sum(len(s["ct"]["files"]) for s in manifest["studies"])
    data = load_synthetic(synth, SPEC, progress=False)
    assert len(data) == n and data.images.shape == (n, 1, 32, 32)
    assert data.masks is not None and set(np.unique(data.masks)) <= {0, 1, 2}
    expected = [y for s in manifest["studies"] for y in s["ct"]["slice_labels"]]
    assert data.labels.tolist() == expected
    assert set(data.splits) <= {"train", "val", "test"}
    again = load_synthetic(synth, SPEC, progress=False)  # from the .npz cache
    np.testing.assert_array_equal(again.images, data.images)
    assert data.fingerprint.startswith("sha256:") and again.fingerprint == data.fingerprint


def test_nifti_orientation_matches_docs(synth: Path) -> None:
    study = _manifest(synth)["studies"][0]
    lung = read_nifti_slices(synth / study["ct"]["lung_mask"])
    assert lung.shape == (len(study["ct"]["files"]), study["ct"]["rows"], study["ct"]["columns"])


def _user_folder(synth: Path, tmp_path: Path) -> tuple[Path, list[dict[str, str]]]:
    user = tmp_path / "user"
    rows = []
    for study in _manifest(synth)["studies"]:
        for i, name in enumerate(study["ct"]["files"]):
            rel = f"{study['study_id']}/{name}"
            (user / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(synth / study["ct"]["dir"] / name, user / rel)
            rows.append({"file": rel, "label": str(study["ct"]["slice_labels"][i]),
                         "study_id": study["study_id"], "split": study["split"]})
    return user, rows


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_corrupt_dicom_is_skipped_and_reported(synth: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    user, rows = _user_folder(synth, tmp_path)
    bad = user / rows[3]["file"]
    bad.write_bytes(bad.read_bytes()[:300])  # truncated mid-header
    csv_path = _write_csv(user / "labels.csv", rows)
    data = load_dicom_folder(user, csv_path, SPEC, labels=("no_nodule", "nodule"),
                             progress=False)
    assert len(data) == len(rows) - 1
    assert [s.path for s in data.summary.skipped] == [rows[3]["file"]]
    with caplog.at_level(logging.WARNING):
        data.summary.log("user")
    assert rows[3]["file"] in caplog.text
    assert data.labels.tolist() == [int(r["label"]) for i, r in enumerate(rows) if i != 3]


def test_rows_by_sop_instance_uid_and_label_names(synth: Path, tmp_path: Path) -> None:
    user, rows = _user_folder(synth, tmp_path)
    (user / "notes.bin").write_bytes(b"not dicom")  # indexed, skipped, never fatal
    by_uid = []
    for r in rows[:4]:
        uid = pydicom.dcmread(user / r["file"], stop_before_pixels=True).SOPInstanceUID
        by_uid.append({"sop_instance_uid": uid,
                       "label": "nodule" if r["label"] == "1" else "no_nodule"})
    by_uid.append({"sop_instance_uid": "1.2.3.4", "label": "nodule"})  # no such file
    data = load_dicom_folder(user, _write_csv(tmp_path / "uids.csv", by_uid), SPEC,
                             labels=("no_nodule", "nodule"), progress=False)
    assert len(data) == 4
    assert data.labels.tolist() == [int(r["label"]) for r in rows[:4]]
    reasons = " ".join(s.reason for s in data.summary.skipped)
    assert "sop_instance_uid" in reasons and "not readable as DICOM" in reasons


def test_missing_label_column_raises(synth: Path, tmp_path: Path) -> None:
    user, rows = _user_folder(synth, tmp_path)
    csv_path = _write_csv(tmp_path / "x.csv", [{"file": r["file"]} for r in rows])
    with pytest.raises(DataError, match="label column"):
        load_dicom_folder(user, csv_path, SPEC, labels=("a", "b"), progress=False)


def test_nifti_and_seg_masks_through_the_csv(synth: Path, tmp_path: Path) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    study = _manifest(synth)["studies"][0]
    lung = read_nifti_slices(synth / study["ct"]["lung_mask"])
    nodule = read_nifti_slices(synth / study["ct"]["nodule_mask"])
    reference = combine_lung_nodule(lung, nodule)
    paths = [synth / study["ct"]["dir"] / f for f in study["ct"]["files"][:3]]
    sources = [pydicom.dcmread(p) for p in paths]
    desc = [hd.seg.SegmentDescription(
        segment_number=k, segment_label=name,
        segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Lung,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for k, name in ((1, "lung"), (2, "nodule"))]
    pixels = np.stack([reference[:3] == 1, reference[:3] == 2], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=desc,
        series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="0", device_serial_number="0", omit_empty_frames=False)
    user = tmp_path / "seg"
    user.mkdir()
    seg.save_as(user / "mask.dcm")
    shutil.copyfile(synth / study["ct"]["lung_mask"], user / "lung.nii.gz")
    rows = []
    for i, p in enumerate(paths):
        shutil.copyfile(p, user / p.name)
        rows.append({"file": p.name, "label": "0", "mask": "mask.dcm", "slice_index": ""})
        rows.append({"file": p.name, "label": "0", "mask": "lung.nii.gz",
                     "slice_index": str(i)})
    data = load_dicom_folder(user, _write_csv(user / "labels.csv", rows), SPEC,
                             labels=("no_nodule", "nodule"), mask_labels=SEGMENT_LABELS,
                             progress=False)
    assert len(data) == 6 and not data.summary.skipped and data.masks is not None
    for i in range(3):
        np.testing.assert_array_equal(data.masks[2 * i], fit_mask(reference[i], SPEC))
        np.testing.assert_array_equal(data.masks[2 * i + 1], fit_mask(lung[i], SPEC))


def test_coco_boxes_validate(synth: Path, tmp_path: Path) -> None:
    coco_path = synth / "labels" / "boxes_coco.json"
    coco = load_coco(coco_path, synth)
    assert not coco.skipped and coco.images and "nodule" in coco.categories.values()
    doc = json.loads(coco_path.read_text())
    img = doc["images"][0]
    doc["annotations"] += [
        {"id": 9001, "image_id": img["id"], "category_id": doc["categories"][0]["id"],
         "bbox": [img["width"] - 1, 0, 5, 5]},  # outside the image
        {"id": 9002, "image_id": -7, "category_id": doc["categories"][0]["id"],
         "bbox": [0, 0, 1, 1]},  # unknown image
    ]
    bad = tmp_path / "coco.json"
    bad.write_text(json.dumps(doc))
    checked = load_coco(bad)
    assert len(checked.boxes) == len(coco.boxes) and len(checked.skipped) == 2
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="broken.json"):
        load_coco(tmp_path / "broken.json")


@pytest.mark.parametrize("spacing_mm", [None, 2.3])
def test_context_stacks_neighbours_in_volume_order_like_serving(synth: Path,
                                                               spacing_mm: float | None) -> None:
    data = load_synthetic(synth, SPEC, progress=False)
    assert data.geometry is not None and np.isfinite(data.geometry).all()
    # shuffle the loaded order: the stacking must follow positions, not file order
    perm = np.random.default_rng(0).permutation(len(data))
    shuffled = data.select(perm)
    stacked = shuffled.with_context(1, spacing_mm)
    assert stacked.images.shape == (len(data), 3, 32, 32) and stacked.context_slices == 1
    study = _manifest(synth)["studies"][0]
    paths = [synth / study["ct"]["dir"] / f for f in study["ct"]["files"]]
    datasets = [pydicom.dcmread(p) for p in paths]
    frames = [frame_geometries(ds)[0] for ds in datasets]
    order, _, distances = slice_order(frames)
    offline = stack_context([preprocess_image(decode(datasets[i]).frames[0],
                                              decode(datasets[i]).meta, SPEC) for i in order], 1,
                            distances=distances, spacing_mm=spacing_mm)
    for row, i in enumerate(order):
        rel = f"{study['ct']['dir']}/{study['ct']['files'][i]}"
        at = int(np.flatnonzero(stacked.sources == rel)[0])
        np.testing.assert_array_equal(stacked.images[at], offline[row], err_msg=rel)
        np.testing.assert_array_equal(stacked.images[at, 1], shuffled.images[at, 0])
    with pytest.raises(ValueError):
        stacked.with_context(1)


def test_prepare_data_stacks_a_mm_context(synth: Path, tmp_path: Path) -> None:
    import argparse

    from trainer.command import add_arguments, prepare_data

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["classify", "--data", str(synth), "--repo", str(tmp_path),
                              "--model", "m", "--no-progress"])
    spec = PreprocessSpec(height=32, width=32, window_center=-600, window_width=1500,
                          context_slices=2, context_spacing_mm=4.0)
    data = prepare_data(args, spec)
    assert data.images.shape[1:] == (5, 32, 32) and data.context_slices == 2
    assert spec.single_slice() == SPEC
    assert data.images.dtype == np.float16  # the classifier's default storage
    for split in ("train", "val", "test"):  # each split one run: the subsets are views
        if (data.splits == split).any():
            assert np.shares_memory(data.subset(split).images, data.images)


def test_grouped_by_split_gives_the_same_subsets_as_views(synth: Path) -> None:
    data = load_synthetic(synth, SPEC, progress=False)
    assert len(set(data.splits)) > 1
    grouped = data.grouped_by_split()
    ranks = [("train", "val", "test").index(s) for s in grouped.splits]
    assert ranks == sorted(ranks) and sorted(grouped.sources) == sorted(data.sources)
    for split in ("train", "val", "test"):
        before, after = data.subset(split), grouped.subset(split)
        assert list(after.sources) == list(before.sources)  # the order within a split kept
        np.testing.assert_array_equal(after.images, before.images)
        np.testing.assert_array_equal(after.masks, before.masks)
        np.testing.assert_array_equal(after.nodule_mm, before.nodule_mm)
        assert np.shares_memory(after.images, grouped.images)
    assert grouped.grouped_by_split() is grouped
    # an index array or a scattered selection still copies, in the order asked for
    picked = grouped.select(np.array([3, 0, 2]))
    assert list(picked.sources) == [grouped.sources[i] for i in (3, 0, 2)]
    scattered = np.zeros(len(grouped), bool)
    scattered[[0, 2]] = True
    assert not np.shares_memory(grouped.select(scattered).images, grouped.images)


def test_float16_storage_gives_the_same_crops_within_float16_precision(synth: Path) -> None:
    from trainer.classify import ClassifyHooks

    spec = PreprocessSpec(height=64, width=64, window_center=-600, window_width=1500)
    data = load_synthetic(synth, spec, progress=False)
    full = data.with_context(2, 4.0)
    half = data.with_context(2, 4.0, dtype=np.float16)
    assert full.images.dtype == np.float32 and half.images.dtype == np.float16
    assert full.images.nbytes == 2 * half.images.nbytes
    np.testing.assert_array_equal(half.images, full.images.astype(np.float16))
    hooks = ClassifyHooks(min_visible_mm=3.0, crop=32)
    idx = np.flatnonzero(hooks.sample_weights(full) > 0)
    x32, y32, m32 = hooks.make_batch(full, idx, np.random.default_rng(5))
    x16, y16, m16 = hooks.make_batch(half, idx, np.random.default_rng(5))
    assert x16.dtype == x32.dtype == torch.float32 and x16.shape == x32.shape
    # the same windows (same labels and masks), pixels within float16's rounding
    assert y16 is not None and y32 is not None and (y16 == y32).all()
    assert m16 is not None and m32 is not None and (m16 == m32).all()
    np.testing.assert_allclose(x16.numpy(), x32.numpy(), rtol=2.0 ** -11, atol=2.0 ** -24)
    assert float((x16 - x32).abs().max()) > 0  # really stored at lower precision
