"""A short real training run on a tiny synthetic set, end to end: train, publish into a tmp
repository, load the ONNX with ONNX Runtime, check parity, the Triton layout and the sidecar;
then resume, re-export, and a run on a user DICOM folder with a corrupt file."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edge.cli import main as cli
from edge.core.types import Task
from edge.repository.model_config import read_model_config
from edge.repository.sidecar import read_sidecar
from trainer.datasets import load_synthetic
from trainer.heldout import main as heldout
from trainer.models import ModelSpec, build_model

pytestmark = pytest.mark.slow

TINY = ["--size", "32", "--samples-per-epoch", "48", "--batch-size", "16",
        "--widths", "8,16,32,64", "--no-progress"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    assert cli(["synth", "--out", str(out), "--studies", "5", "--seed", "1", "--size", "64",
                "--slices-min", "8", "--slices-max", "10", "--quiet"]) == 0
    splits = {s["split"] for s in json.loads((out / "manifest.json").read_text())["studies"]}
    assert {"train", "val"} <= splits
    return out


def _check_published(repo: Path, name: str, version: int, task: Task, data: Path,
                     checkpoint: str = "best.pt") -> None:
    model_dir = repo / name
    config = read_model_config(model_dir)
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
    sidecar = read_sidecar(model_dir)
    assert sidecar is not None and sidecar.task is task
    channels = sidecar.preprocess.channels  # 2k + 1 for a 2.5D classifier
    assert [i.name for i in config.input] == ["image"]
    assert list(config.input[0].dims) == [channels, 32, 32]
    assert config.instance_group[0].count == 1 and config.dynamic_batching.preferred_batch_size
    assert sidecar.applicability.modality == ("CT",)
    assert sidecar.applicability.body_part == ("CHEST",)
    assert sidecar.postprocess["activation"] == "softmax"
    prov = sidecar.provenance
    assert prov["data_fingerprint"].startswith("sha256:") and prov["git_commit"]
    assert {"torch", "monai", "seed", "epochs", "trained_at"} <= set(prov)
    record = sidecar.versions[version]
    names = ({"auc", "accuracy", "sensitivity", "specificity", "f1"} if task is Task.CLASSIFY
             else {"dice_lung", "dice_nodule", "iou_lung", "iou_nodule", "dice_mean"})
    assert names <= set(record.metrics)
    onnx_path = model_dir / str(version) / "model.onnx"
    assert set(record.files) == {"model.onnx"}
    # ONNX Runtime on real preprocessed slices vs the torch checkpoint.
    spec = sidecar.preprocess  # a 2.5D model's slices stacked as the trainer and serving do
    slices = load_synthetic(data, spec.single_slice(), progress=False).with_context(
        spec.context_slices, spec.context_spacing_mm).images[:6]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"image": slices})[0]
    state = torch.load(repo.parent / "runs" / name / checkpoint, weights_only=False)
    model = build_model(ModelSpec.from_dict(state["model_spec"]))
    model.load_state_dict(state["state_dict"])
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(slices)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_classify_train_publish_resume_export(synth: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    base = ["train", "classify", "--data", str(synth), "--repo", str(repo), "--model", "cls"]
    assert cli([*base, "--epochs", "1", *TINY]) == 0
    _check_published(repo, "cls", 1, Task.CLASSIFY, synth, checkpoint="average.pt")
    report = repo.parent / "runs" / "cls" / "report"
    for png in ("learning_curves.png", "roc.png", "confusion_matrix.png"):
        assert (report / png).stat().st_size > 1000
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["version"] == 1 and len(metrics["history"]) == 1

    assert cli([*base, "--epochs", "2", "--resume", *TINY]) == 0  # continues at epoch 2
    history = json.loads((report / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert read_sidecar(repo / "cls").versions.keys() == {1, 2}
    _check_published(repo, "cls", 2, Task.CLASSIFY, synth, checkpoint="average.pt")

    ck = repo.parent / "runs" / "cls" / "best.pt"
    assert cli(["export", "--checkpoint", str(ck), "--data", str(synth), "--repo", str(repo),
                "--model", "cls", "--no-progress"]) == 0
    _check_published(repo, "cls", 3, Task.CLASSIFY, synth)


def test_segment_train_publish(synth: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    assert cli(["train", "segment", "--data", str(synth), "--repo", str(repo), "--model", "seg",
                "--epochs", "1", *TINY]) == 0
    _check_published(repo, "seg", 1, Task.SEGMENT, synth)
    assert (repo.parent / "runs" / "seg" / "report" / "overlays.png").is_file()


def test_user_dicom_folder_with_corrupt_file_trains(synth: Path, tmp_path: Path) -> None:
    user = tmp_path / "user"
    manifest = json.loads((synth / "manifest.json").read_text())
    rows = []
    for study in manifest["studies"]:
        for i, name in enumerate(study["ct"]["files"]):
            rel = f"{study['study_id']}/{name}"
            (user / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(synth / study["ct"]["dir"] / name, user / rel)
            rows.append({"file": rel, "label": study["ct"]["slice_labels"][i],
                         "study_id": study["study_id"], "split": study["split"]})
    (user / rows[0]["file"]).write_bytes(b"DICM but truncated")
    with open(user / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    repo = tmp_path / "models"
    assert cli(["train", "classify", "--data", str(user), "--repo", str(repo), "--model", "u",
                "--epochs", "1", *TINY]) == 0
    summary = json.loads((tmp_path / "runs" / "u" / "report" / "metrics.json").read_text())
    assert summary["load_summary"]["skipped"] == 1
    assert summary["load_summary"]["skipped_files"][0]["path"] == rows[0]["file"]


def test_same_seed_same_weights(synth: Path, tmp_path: Path) -> None:
    states = []
    for run in ("a", "b"):
        work = tmp_path / run
        assert cli(["train", "segment", "--data", str(synth), "--repo", str(tmp_path / "m"),
                    "--model", run, "--epochs", "1", "--seed", "3", "--work-dir", str(work),
                    *TINY]) == 0
        states.append(torch.load(work / "best.pt", weights_only=False)["state_dict"])
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_ema_weights_are_validated_kept_and_resumed(synth: Path, tmp_path: Path) -> None:
    """With --ema-decay the averaged weights are what best.pt (and so the export) holds; the
    raw weights and the average both go into last.pt so --resume continues both."""
    work = tmp_path / "run"
    base = ["train", "classify", "--data", str(synth), "--repo", str(tmp_path / "m"),
            "--model", "ema", "--work-dir", str(work), "--ema-decay", "0.9", *TINY]
    assert cli([*base, "--epochs", "1"]) == 0
    best = torch.load(work / "best.pt", weights_only=False)
    last = torch.load(work / "last.pt", weights_only=False)
    assert best["weights"] == "ema 0.9" and last["ema_updates"] == 3  # 48 samples / 16
    for key, value in best["state_dict"].items():
        assert torch.equal(value, last["ema_state_dict"][key]), key
    assert any(not torch.equal(v, last["state_dict"][k])
               for k, v in best["state_dict"].items() if v.is_floating_point())
    assert cli([*base, "--epochs", "2", "--resume"]) == 0
    assert torch.load(work / "last.pt", weights_only=False)["ema_updates"] == 6


def test_average_of_the_last_epochs_is_published(synth: Path, tmp_path: Path) -> None:
    """With --average-last 2 the mean of the last two epochs' weights (batch-norm statistics
    measured anew) is what average.pt holds and what is published; --snapshots keeps every
    epoch's raw weights."""
    repo = tmp_path / "models"
    assert cli(["train", "classify", "--data", str(synth), "--repo", str(repo), "--model", "avg",
                "--epochs", "3", "--average-last", "2", "--snapshots", *TINY]) == 0
    work = repo.parent / "runs" / "avg"
    avg = torch.load(work / "average.pt", weights_only=False)
    assert avg["weights"] == "average of epochs 2-3" and avg["average_epochs"] == 2
    snaps = [torch.load(work / "epochs" / f"epoch-{e:03d}.pt", weights_only=False)["state_dict"]
             for e in (1, 2, 3)]
    for key, value in avg["state_dict"].items():
        if value.is_floating_point() and "running_" not in key:
            torch.testing.assert_close(value, (snaps[1][key] + snaps[2][key]) / 2)
    assert read_sidecar(repo / "avg").provenance["weights"] == "average of epochs 2-3"
    _check_published(repo, "avg", 1, Task.CLASSIFY, synth, checkpoint="average.pt")


def test_heldout_scores_a_checkpoint_on_every_study(synth: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "run"
    assert cli(["train", "classify", "--data", str(synth), "--repo", str(tmp_path / "m"),
                "--model", "c", "--work-dir", str(work), "--epochs", "1", *TINY]) == 0
    capsys.readouterr()
    assert heldout(["classify", "--data", str(synth), str(work / "best.pt")]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["checkpoint"] == str(work / "best.pt") and 0.0 <= row["auc_any_touch"] <= 1.0
    assert heldout(["classify", "--data", str(synth), f"{work / 'best.pt'}:no_such_key"]) == 1
    assert "no_such_key" in capsys.readouterr().err
