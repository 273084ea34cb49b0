#!/usr/bin/env python
"""DICOM in and out on real scans: read time and fidelity of a series, DICOM-SEG write and read-back.

    python benchmarks/dicom_io.py [--repeats 3]
    python benchmarks/dicom_io.py --checkpoint runs/demo/best.pt [--cases 10]

Each pyradiomics case of ``data/demo/pyradiomics`` (brain MR, LAS, 256x256x25; lung CT, LPS, HU,
140x110x61) is written as a DICOM series with SimpleITK's GDCM writer (one file per slice, the
geometry and rescale tags set), then read back with ``seg.io.read_case`` (what ``infer_seg.py -i``
does) and compared with the same scan read from its NRRD: array equal, geometry within ``seg.io``'s
tolerance.  Its label map is written as a DICOM-SEG over that series (``seg.io.write_label`` to
``.dcm``) and read back with highdicom, masks compared voxel for voxel.  Times are medians of
``--repeats`` runs on this machine (the CPU is printed).

With ``--checkpoint`` (a trained hippocampus model), ``--cases`` validation subjects of fold 0 are
also written as DICOM series and segmented twice with ``infer_seg.py``: from the series (DICOM-SEG
out) and from the NIfTI files (NIfTI out); the DICOM-SEG masks read back with highdicom are compared
with the NIfTI label maps voxel for voxel.
"""
from __future__ import annotations

import argparse
import locale
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from seg import io  # noqa: E402

DATA = ROOT / "data" / "demo" / "pyradiomics"


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = {l.split(":", 1)[0].strip(): l.split(":", 1)[1].strip() for l in out.splitlines() if ":" in l}
        flags = [f for f in fields.get("Flags", "").split() if f.startswith(("avx512", "amx", "avx2"))]
        return (f"{fields.get('Model name', '?')} (model {fields.get('Model', '?')}), "
                f"{os.cpu_count()} cores, {' '.join(flags)}")
    except Exception:  # noqa: BLE001
        return platform.processor() or "unknown CPU"


def write_series(img: sitk.Image, folder: Path, modality: str, slope: float | None = None,
                 patient: str = "BENCH") -> None:
    """``img`` (int16) as one DICOM file per slice, with position, orientation, spacing and UIDs; a
    float ``img`` with ``slope``: stored as 16-bit integers that the slope scales back (GDCM rescales,
    as in SimpleITK's "Dicom Series From Array" example)."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    tags = {"0010|0020": patient, "0020|000d": generate_uid(), "0020|000e": generate_uid(),
            "0020|0011": "3", "0020|0052": generate_uid(), "0008|0060": modality, "0028|1052": "0", "0028|1053": f"{slope or 1:.10g}",
            "0018|0050": str(img.GetSpacing()[2]),
            "0020|0037": "\\".join(f"{v:.8f}" for v in (*d[:, 0], *d[:, 1]))}
    if slope is not None:
        tags.update({"0028|0100": "16", "0028|0101": "16", "0028|0102": "15", "0028|0103": "1"})
    ctype = locale.setlocale(locale.LC_CTYPE)
    for k in range(img.GetDepth()):
        piece = img[:, :, k]
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        piece.SetMetaData("0020|0032", "\\".join(f"{v:.8f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
        piece.SetMetaData("0020|0013", str(k + 1))
        piece.SetMetaData("0008|0018", generate_uid())
        writer.SetFileName(str(folder / f"IM{k:04d}"))
        writer.Execute(piece)
    locale.setlocale(locale.LC_CTYPE, ctype)  # GDCM's writer leaves LC_CTYPE at "C"


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint", help="also segment hippocampus subjects as DICOM and as NIfTI")
    ap.add_argument("--cases", type=int, default=10)
    args = ap.parse_args()
    import highdicom as hd

    print(f"command: python {' '.join(sys.argv)}\nCPU: {cpu()}\n")
    print("| case | size | NRRD read (s) | DICOM series read (s) | voxels equal to the NRRD's | "
          "DICOM-SEG write (s) | masks read back equal (highdicom) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, modality in (("brain1", "MR"), ("lung2", "CT")):
            nrrd = DATA / "imagesTr" / f"{name}.nrrd"
            series = Path(tmp) / name
            write_series(sitk.ReadImage(str(nrrd)), series, modality)
            t_nrrd, (ref, ref_meta) = timed(lambda: io.read_case(nrrd), args.repeats)
            case, = io.image_cases(series)
            t_dcm, (arr, meta) = timed(lambda: io.read_case(case.images), args.repeats)
            # the series on the NRRD's grid (a left-handed volume, like brain1, comes back with its
            # slice axis reversed: DICOM's slice normal is row x column): the same physical image?
            series_img = meta.apply(sitk.GetImageFromArray(arr[0].transpose(2, 1, 0)))
            ref_img = ref_meta.apply(sitk.GetImageFromArray(ref[0].transpose(2, 1, 0)))
            on_ref = sitk.GetArrayFromImage(sitk.Resample(series_img, ref_img, sitk.Transform(),
                                                          sitk.sitkNearestNeighbor)).transpose(2, 1, 0)
            equal = "yes" if np.array_equal(arr, ref) else (
                "same physical image, slice axis reversed" if np.array_equal(on_ref, ref[0]) else "NO")
            label_img = sitk.ReadImage(str(DATA / "labelsTr" / f"{name}.nrrd"))
            label = sitk.GetArrayFromImage(sitk.Resample(label_img, series_img, sitk.Transform(),
                                                         sitk.sitkNearestNeighbor)).transpose(2, 1, 0)
            out = Path(tmp) / f"{name}_seg.dcm"
            t_seg, _ = timed(lambda: io.write_label(out, label, meta, segments=[("tumour", 1)]), args.repeats)
            seg = hd.seg.segread(out)
            normal = np.cross(*np.reshape(meta.dicom[0].ImageOrientationPatient, (2, 3)))
            order = sorted((ds.SOPInstanceUID for ds in meta.dicom),
                           key=lambda uid: np.dot(next(d for d in meta.dicom if d.SOPInstanceUID == uid)
                                                  .ImagePositionPatient, normal))
            masks = seg.get_pixels_by_source_instance(order, segment_numbers=[1])[..., 0]  # (Z, rows, cols)
            # our (X, Y, Z) label in the series' slice order (normal-sorted)
            expect = label.transpose(2, 1, 0)
            same_masks = masks.shape == expect.shape and np.array_equal(masks.astype(bool), expect == 1)
            size = "x".join(map(str, ref.shape[1:]))
            print(f"| {name} ({modality}) | {size} | {t_nrrd:.3f} | {t_dcm:.3f} | {equal} | "
                  f"{t_seg:.3f} | {same_masks} |")
    if args.checkpoint:
        through_infer_seg(args.checkpoint, args.cases)


def through_infer_seg(checkpoint: str, n: int) -> None:
    """infer_seg.py on DICOM series and on the same subjects' NIfTI files: the same labels?"""
    import json

    import highdicom as hd

    demo = ROOT / "data" / "demo" / "hippocampus"
    names = json.loads((demo / "splits_final.json").read_text())[0]["val"][:n]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in names:
            # float MR intensities stored as int16 with a rescale slope, as scanners store them; the
            # NIfTI input is the series as read (so both runs see the same voxels)
            img = sitk.ReadImage(str(demo / "imagesTr" / f"{name}.nii.gz"))
            slope = float(sitk.GetArrayViewFromImage(img).max()) / 32000.0
            write_series(sitk.Cast(img, sitk.sitkFloat64), tmp / "dicom" / name, "MR", slope, patient=name)
            case, = io.image_cases(tmp / "dicom" / name)
            arr, meta = io.read_case(case.images)
            io.write_image(tmp / "nifti" / f"{name}.nii.gz", arr, meta)
        times = {}
        for kind, fmt in (("dicom", "dicom-seg"), ("nifti", "nii.gz")):
            t = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "infer_seg.py"), "-i", str(tmp / kind), "-o",
                            str(tmp / f"out_{kind}"), "-m", checkpoint, "--format", fmt, "--device", "cpu"],
                           check=True, capture_output=True, text=True)
            times[kind] = time.perf_counter() - t
        differing = voxels = foreground = 0
        segs = sorted((tmp / "out_dicom").glob("*.dcm"))
        for name in names:
            seg = hd.seg.segread(tmp / "out_dicom" / f"{name}_3_MR.dcm")  # <PatientID>_<SeriesNumber>_<Modality>
            case, = io.image_cases(tmp / "dicom" / name)
            _, meta = io.read_case(case.images)
            uids = [ds.SOPInstanceUID for ds in meta.dicom]  # in the order of the last array axis
            numbers = seg.get_segment_numbers()
            masks = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers,
                                                      assert_missing_frames_are_empty=True)
            values = [int(seg.get_segment_description(k).tracking_id.rsplit(" ", 1)[1].rstrip(")"))
                      for k in numbers]
            from_seg = np.zeros(masks.shape[:3], np.uint8)
            for k, v in enumerate(values):
                from_seg[masks[..., k] > 0] = v
            label, _ = io.read_label(tmp / "out_nifti" / f"{name}.nii.gz")
            differing += int((from_seg.transpose(2, 1, 0) != label).sum())
            voxels += label.size
            foreground += int((label > 0).sum())
        print(f"\ninfer_seg.py -m {checkpoint} on {len(names)} hippocampus validation subjects: "
              f"{len(segs)} DICOM-SEG files, {differing} of {voxels:,} voxels ({foreground:,} foreground) "
              f"differ from the NIfTI outputs; {times['dicom']:.1f} s from DICOM series, {times['nifti']:.1f} s from NIfTI "
              "(both including start-up)")


if __name__ == "__main__":
    main()
