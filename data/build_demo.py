"""Rebuild the embedded demo data set (developers only; users get the committed files).

Reads the raw sources (MNI ICBM152 2009a template from the nilearn 0.14.1 wheel and pyradiomics 3.0.1
test cases) from ``--source`` and writes ``data/demo/``::

    python data/build_demo.py --source ../shared/data

* ``mni152/``: 3-class tissue task (0 background, 1 grey matter, 2 white matter).  Foreground where
  max(gm, wm) >= 128; grey matter where gm >= wm, else white matter.  The volume is cropped to the
  brain (2-voxel margin) and cut into interleaved axial slabs of ``--slab`` slices: even slabs go to
  ``imagesTr/labelsTr``, odd slabs to ``imagesVal/labelsVal``, so training and validation both cover
  the whole brain.  Slabs keep their true position (origin) in scanner space.
* ``pyradiomics/``: brain1, brain2 (MR T1, LAS, 0.78x0.78x6.5 mm) as given, lung2 (CT, LPS) cropped
  around its tumour, as .nrrd with their labels.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

MNI = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def write(img: sitk.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)


def tissue_labels(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    fg = np.maximum(gm, wm) >= 128
    return np.where(fg, np.where(gm >= wm, 1, 2), 0).astype(np.uint8)


def build_mni(src: Path, out: Path, slab: int) -> None:
    t1 = sitk.ReadImage(str(src / "mni152" / MNI.format("t1")))
    gm = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "mni152" / MNI.format("gm"))))
    wm = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "mni152" / MNI.format("wm"))))
    lab = sitk.GetImageFromArray(tissue_labels(gm, wm))
    lab.CopyInformation(t1)
    # bounding box of the brain, in SimpleITK (x, y, z) index order, with a 2-voxel margin
    zyx = np.argwhere(sitk.GetArrayFromImage(t1) > 0)
    lo = np.maximum(zyx.min(0)[::-1] - 2, 0)
    hi = np.minimum(zyx.max(0)[::-1] + 3, np.array(t1.GetSize()))
    z0, z1 = int(lo[2]), int(hi[2])
    for i, start in enumerate(range(z0, z1, slab)):
        stop = min(start + slab, z1)
        split = "Tr" if i % 2 == 0 else "Val"
        box = (slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1])), slice(start, stop))
        name = f"mni152_slab{i:02d}.nii.gz"
        write(t1[box], out / "mni152" / f"images{split}" / name)
        write(lab[box], out / "mni152" / f"labels{split}" / name)


def build_pyradiomics(src: Path, out: Path) -> None:
    d = src / "pyradiomics"
    crops = {"lung2": (slice(290, 430), slice(310, 420), slice(0, 61))}
    for case in ("brain1", "brain2", "lung2"):
        img = sitk.ReadImage(str(d / f"{case}_image.nrrd"))
        lab = sitk.ReadImage(str(d / f"{case}_label.nrrd"))
        if case in crops:
            img, lab = img[crops[case]], lab[crops[case]]
        write(img, out / "pyradiomics" / "imagesTr" / f"{case}.nrrd")
        write(sitk.Cast(lab, sitk.sitkUInt8), out / "pyradiomics" / "labelsTr" / f"{case}.nrrd")
    shutil.copy(d / "LICENSE.txt", out / "pyradiomics" / "LICENSE.txt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="../shared/data", help="folder with mni152/ and pyradiomics/")
    ap.add_argument("--out", default=str(Path(__file__).parent / "demo"))
    ap.add_argument("--slab", type=int, default=32, help="axial slices per slab")
    args = ap.parse_args()
    out = Path(args.out)
    for sub in ("mni152", "pyradiomics"):
        shutil.rmtree(out / sub, ignore_errors=True)
    build_mni(Path(args.source), out, args.slab)
    build_pyradiomics(Path(args.source), out)
    for root, _, files in sorted(os.walk(out)):
        for f in sorted(files):
            p = Path(root) / f
            print(f"{p.relative_to(out)}  {p.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
