"""``mededge synth``: synthetic chest CT + DX studies with ground truth (docs/data-format.md).

Each study draws everything from its own generator seeded with ``(seed, study index)``, so a
study's content does not depend on how many studies are made; folder-wide choices (splits, which
studies are compressed, signed, MONOCHROME1) come from a separate generator. No clock is read:
the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from tqdm import tqdm

from trainer.synth.dicom_writer import StudyInfo, deterministic_uid, write_ct_series, write_dx
from trainer.synth.ground_truth import (
    StudyGroundTruth,
    WrittenStudy,
    assign_splits,
    write_study_labels,
    write_tables,
)
from trainer.synth.phantom import Geometry, make_phantom, random_anatomy

log = logging.getLogger(__name__)

#: Compressed transfer syntaxes, used in turn by the compressed studies (all lossless).
COMPRESSED_SYNTAXES = (JPEG2000Lossless, JPEGLSLossless, RLELossless)
_NODULE_COUNT_P = (0.12, 0.33, 0.22, 0.16, 0.1, 0.07)  # P(0 .. 5 nodules)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mededge synth``."""
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--studies", type=int, required=True, help="number of studies")
    parser.add_argument("--seed", type=int, required=True, help="random seed (deterministic)")
    parser.add_argument("--size", type=int, default=512,
                        help="rows = columns (default 512; the pixel spacing scales with "
                             "512/size so the anatomy keeps its size)")
    parser.add_argument("--slices-min", type=int, default=40)
    parser.add_argument("--slices-max", type=int, default=120)
    parser.add_argument("--max-nodules", type=int, default=5, help="0-N nodules per study")
    parser.add_argument("--compressed-fraction", type=float, default=0.25,
                        help="fraction of studies written JPEG 2000 / JPEG-LS / RLE lossless")
    parser.add_argument("--signed-fraction", type=float, default=0.5,
                        help="fraction of CT series stored signed (PixelRepresentation 1)")
    parser.add_argument("--monochrome1-fraction", type=float, default=0.5,
                        help="fraction of DX images stored MONOCHROME1")
    parser.add_argument("--workers", type=int, default=None,
                        help="studies made in parallel processes (default: the CPU count, "
                             "at most 4; 1: in this process). The files do not depend on it")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _pick(rng: np.random.Generator, n: int, fraction: float) -> list[int]:
    """``round(n * fraction)`` study indices, in a random order."""
    count = min(n, max(0, round(n * fraction)))
    return [int(i) for i in rng.permutation(n)[:count]]


def study_info(rng: np.random.Generator, seed: int, index: int) -> StudyInfo:
    """Synthetic demographics, dates and UIDs of study ``index``, all from ``rng``."""
    study_id = f"study-{index:04d}"
    entropy = ("mededge-synth", str(seed), study_id)
    date = dt.date(2023, 1, 1) + dt.timedelta(days=int(rng.integers(0, 730)))
    age = int(rng.integers(35, 86))
    birth = date - dt.timedelta(days=365 * age + int(rng.integers(1, 360)))
    seconds = int(rng.integers(7 * 3600, 19 * 3600))
    return StudyInfo(
        study_id=study_id, patient_name=f"SYNTH^P{index + 1:04d}",
        patient_id=f"SYN{seed % 100000:05d}{index + 1:04d}",
        birth_date=birth.strftime("%Y%m%d"), sex=str(rng.choice(["M", "F"])),
        age=f"{(date - birth).days // 365:03d}Y", study_date=date.strftime("%Y%m%d"),
        study_time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
        accession=f"A{seed % 10000:04d}{index:05d}",
        study_instance_uid=deterministic_uid(*entropy, "study"),
        frame_of_reference_uid=deterministic_uid(*entropy, "for"),
        uid_entropy=entropy)


def make_study(args: argparse.Namespace, index: int, split: str, ct_syntax: str, signed: bool,
               monochrome1: bool) -> StudyGroundTruth:
    """Generate, write and label one study."""
    rng = np.random.default_rng([args.seed, index])
    info = study_info(rng, args.seed, index)
    spacing = round(float(rng.uniform(0.6, 0.9)) * 512 / args.size, 4)
    slices = int(rng.integers(args.slices_min, args.slices_max + 1))
    thickness = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0]))
    anatomy = random_anatomy(rng, args.size * spacing)
    coverage = slices * thickness
    height = anatomy.lung_height
    if coverage < 0.85 * height:  # a slab inside the lungs
        z0 = float(rng.uniform(0.08 * height, 0.93 * height - coverage))
    else:
        z0 = (height - coverage) / 2
    geometry = Geometry(rows=args.size, columns=args.size, slices=slices, pixel_spacing=spacing,
                        slice_spacing=thickness, z0=round(z0, 2))
    p = np.array(_NODULE_COUNT_P[: args.max_nodules + 1])
    n_nodules = int(rng.choice(len(p), p=p / p.sum()))
    phantom = make_phantom(rng, geometry, anatomy, n_nodules, float(rng.uniform(10.0, 25.0)))
    study_dir = args.out / info.study_id
    ct_files = write_ct_series(phantom, info, study_dir / "ct", signed=signed,
                               transfer_syntax=ct_syntax, slice_thickness=thickness)
    dx_file, _, dx_series, dx_syntax = write_dx(phantom, info, study_dir / "dx",
                                                monochrome1=monochrome1, transfer_syntax=ct_syntax)
    written = WrittenStudy(
        study_id=info.study_id, split=split, patient_id=info.patient_id,
        study_instance_uid=info.study_instance_uid, phantom=phantom, slice_thickness=thickness,
        signed=signed, ct_series_uid=info.uid("ct-series"), ct_files=ct_files,
        ct_transfer_syntax=ct_syntax, dx_series_uid=dx_series, dx_file=dx_file,
        dx_transfer_syntax=dx_syntax,
        dx_photometric="MONOCHROME1" if monochrome1 else "MONOCHROME2")
    return write_study_labels(written, args.out)


def _make_study(job: tuple[argparse.Namespace, int, str, str, bool, bool]
                ) -> StudyGroundTruth:
    """``make_study`` in a worker process (quiet openjpeg there too)."""
    logging.getLogger("openjpeg").setLevel(logging.WARNING)
    return make_study(*job)


def _made(study: StudyGroundTruth, bar: tqdm) -> StudyGroundTruth:
    bar.update(1)
    return study


def _clear_previous(out: Path) -> None:
    """Remove what an earlier run listed in ``out/manifest.json`` (and nothing else)."""
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return
    for study in json.loads(manifest.read_text(encoding="utf-8")).get("studies", []):
        path = out / str(study.get("study_id", ""))
        if study.get("study_id") and path.is_dir():
            shutil.rmtree(path)
    if (out / "labels").is_dir():
        shutil.rmtree(out / "labels")
    manifest.unlink()


def run(args: argparse.Namespace) -> int:
    """Write ``args.studies`` studies under ``args.out``; returns the exit code."""
    if args.studies < 1 or args.size < 32 or not 1 <= args.slices_min <= args.slices_max:
        log.error("need --studies >= 1, --size >= 32 and 1 <= --slices-min <= --slices-max")
        return 2
    logging.getLogger("openjpeg").setLevel(logging.WARNING)  # it logs every tile at INFO
    args.out.mkdir(parents=True, exist_ok=True)
    _clear_previous(args.out)
    folder_rng = np.random.default_rng([args.seed, 1 << 31])
    splits = assign_splits(args.studies, folder_rng)
    syntaxes = [ExplicitVRLittleEndian] * args.studies
    for k, i in enumerate(_pick(folder_rng, args.studies, args.compressed_fraction)):
        syntaxes[i] = COMPRESSED_SYNTAXES[k % len(COMPRESSED_SYNTAXES)]
    signed = set(_pick(folder_rng, args.studies, args.signed_fraction))
    mono1 = set(_pick(folder_rng, args.studies, args.monochrome1_fraction))
    started = time.perf_counter()
    jobs = [(args, i, splits[i], syntaxes[i], i in signed, i in mono1)
            for i in range(args.studies)]
    workers = min(args.studies, args.workers or min(os.cpu_count() or 1, 4))
    bar = tqdm(total=args.studies, desc="synth studies", unit="study", disable=args.quiet)
    if workers <= 1:
        studies = [_made(make_study(*job), bar) for job in jobs]
    else:  # each study has its own generator: the same files whatever the order
        with ProcessPoolExecutor(workers) as pool:
            studies = [_made(s, bar) for s in pool.map(_make_study, jobs)]
    bar.close()
    slices = sum(len(s.sop_instance_uids) for s in studies)
    write_tables(studies, args.seed, args.out)
    elapsed = time.perf_counter() - started
    log.info("wrote %d studies (%d CT slices) to %s in %.1f s (%.3f s per slice)",
             args.studies, slices, args.out, elapsed, elapsed / max(slices, 1))
    return 0
