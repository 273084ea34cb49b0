"""Rebuild the embedded demo data set (developers only; users get the committed files).

Reads the raw sources (MNI ICBM152 2009a template from the nilearn 0.14.1 wheel, pyradiomics 3.0.1
test cases and 200 Medical Segmentation Decathlon hippocampus cases) from ``--source`` and writes
``data/demo/``::

    python data/build_demo.py --source ../shared/data
    python data/build_demo.py --only atrium_phantom      # the generated set alone (no --source)

* ``mni152/``: 3-class tissue task (0 background, 1 grey matter, 2 white matter).  Foreground where
  max(gm, wm) >= 128; grey matter where gm >= wm, else white matter.  The volume is cropped to the
  brain (2-voxel margin) and cut into interleaved axial slabs of ``--slab`` slices: even slabs go to
  ``imagesTr/labelsTr``, odd slabs to ``imagesVal/labelsVal``, so training and validation both cover
  the whole brain.  Slabs keep their true position (origin) in scanner space.
* ``pyradiomics/``: brain1, brain2 (MR T1, LAS, 0.78x0.78x6.5 mm) as given, lung2 (CT, LPS) cropped
  around its tumour, as .nrrd with their labels.
* ``atrium_phantom/``: synthetic bright-blood cardiac MRI (``data/thorax.py``), ``PHANTOM_CASES``
  subjects, no source needed: the left atrium (label 1) in a view about 100x88x64 mm at 0.8 mm, with
  the other blood pools around it (``anatomyTr/``: every structure's id, for the look-alike benchmark),
  ``dataset.json``, ``splits_final.json`` (5 folds, as the hippocampus's) and ``LICENSE.txt`` (CC0).
* ``hippocampus/``: MSD Task04, 200 subjects (0 background, 1 anterior, 2 posterior), image/label pairs
  copied byte-for-byte (mixed uint8/float32 images and one float32 label map are left as found), with
  ``dataset.json`` (nnU-Net v2 style), ``splits_final.json`` (nnU-Net format: 5 folds of 40 validation
  cases from a seeded permutation; fold 0 is the default split) and ``LICENSE.txt`` (CC-BY-SA 4.0).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))  # data/thorax.py

MNI = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
MNI_LICENSE = """\
MNI ICBM152 non-linear symmetric template, 2009a (as shipped inside the nilearn 0.14.1 wheel).

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
Institute, McGill University. Permission to use, copy, modify, and distribute this data and its
documentation for any purpose and without fee is hereby granted, provided that the above copyright
notice appear in all copies. The authors and McGill University make no representations about the
suitability of this data for any purpose. It is provided "as is" without express or implied warranty.

Derived here: labels 0 background, 1 grey matter, 2 white matter (foreground where
max(gm, wm) >= 128 on the 0..255 probability maps; grey where gm >= wm); cropped to the brain and cut
into {slab}-slice axial slabs (even slabs: training, odd slabs: validation). See data/build_demo.py.
"""
HIPPO_LICENSE = """\
Hippocampus, Medical Segmentation Decathlon Task04: 200 of the task's 260 training cases
(imagesTr/ and labelsTr/, hippocampus_NNN.nii.gz).

Source: the Medical Segmentation Decathlon (http://medicaldecathlon.com/); Simpson et al. 2019,
"A large annotated medical image dataset for the development and evaluation of segmentation
algorithms", arXiv:1902.09063. Data from Vanderbilt University Medical Center. Obtained as committed
in the public course repository udacity/nd320-c3-3d-imaging-starter (data/TrainingSet/).

Licence: Creative Commons Attribution-ShareAlike 4.0 International (CC-BY-SA 4.0),
https://creativecommons.org/licenses/by-sa/4.0/

The image and label files here are unmodified, byte-for-byte copies of the source files, and stay
under the same licence (CC-BY-SA 4.0): attribute the source above, and distribute this data and any
data derived from it under the same licence. dataset.json and splits_final.json (the 5-fold split,
see data/build_demo.py) describe the data; they are added here and are under the same licence.
"""
HIPPO_DATASET = {
    "channel_names": {"0": "MRI"},
    "labels": {"background": 0, "anterior": 1, "posterior": 2},
    "numTraining": 200,
    "file_ending": ".nii.gz",
    "name": "Hippocampus (MSD Task04, 200 subjects)",
    "description": "Hippocampus head (anterior) and body + tail (posterior), mono-modal MRI cropped "
    "around one hippocampus, 1 mm isotropic; 200 of the 260 training cases of Medical Segmentation "
    "Decathlon Task04, files copied unmodified",
    "reference": "Medical Segmentation Decathlon (medicaldecathlon.com); Simpson et al. 2019, "
    "arXiv:1902.09063; data from Vanderbilt University Medical Center; via "
    "udacity/nd320-c3-3d-imaging-starter data/TrainingSet/",
    "licence": "CC-BY-SA 4.0",
    "licence_url": "https://creativecommons.org/licenses/by-sa/4.0/",
}
PHANTOM_LICENSE = """\
Synthetic bright-blood cardiac MRI with left-atrium labels, generated by data/thorax.py (seeded, so
`python data/build_demo.py --only atrium_phantom` rebuilds these files bit for bit). No person's data
is in it. Dedicated to the public domain: CC0 1.0 Universal,
https://creativecommons.org/publicdomain/zero/1.0/
"""
PHANTOM_DATASET = {
    "channel_names": {"0": "MRI"},
    "labels": {"background": 0, "left_atrium": 1},
    "file_ending": ".nii.gz",
    "name": "Left atrium phantom (synthetic, large field of view)",
    "description": "Synthetic bright-blood cardiac MRI, 0.8 mm isotropic, a view of about 100x88x64 mm "
    "around the left atrium: the atrium (with its appendage and the first 10 mm of its four pulmonary "
    "veins) is a few percent of the volume; the other chambers and great vessels have the same "
    "intensity, several joined to it. anatomyTr/ holds every structure's id (data/thorax.py STRUCTURES).",
    "reference": "generated by data/thorax.py (this repository)",
    "licence": "CC0 1.0",
}
#: subjects of the generated large-field demo (about 0.6 MB each) and the seed of subject 0
PHANTOM_CASES, PHANTOM_SEED = 40, 20_000
SPLIT_SEED = 12345
BUILDS = ("mni152", "pyradiomics", "hippocampus", "atrium_phantom")  # the folders of data/demo/


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
    (out / "mni152" / "LICENSE.txt").write_text(MNI_LICENSE.format(slab=slab))


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


def case_names(folder: Path) -> list[str]:
    return sorted(f.name[: -len(".nii.gz")] for f in folder.glob("*.nii.gz"))


def kfold_splits(cases: list[str], folds: int = 5, seed: int = SPLIT_SEED) -> list[dict]:
    """nnU-Net ``splits_final.json``: the sorted cases, permuted (seeded), cut into ``folds`` val sets."""
    perm = np.random.default_rng(seed).permutation(sorted(cases))
    vals = [sorted(v.tolist()) for v in np.array_split(perm, folds)]
    return [{"train": sorted(set(cases) - set(v)), "val": v} for v in vals]


def write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def build_hippocampus(src: Path, out: Path) -> None:
    d, o = src / "hippocampus", out / "hippocampus"
    cases = case_names(d / "imagesTr")
    if cases != case_names(d / "labelsTr"):
        sys.exit(f"build_demo: {d}/imagesTr and labelsTr do not hold the same cases")
    for sub in ("imagesTr", "labelsTr"):
        (o / sub).mkdir(parents=True, exist_ok=True)
        for case in cases:  # verbatim: dtypes (uint8/float32 images, a float32 label map) left as found
            shutil.copyfile(d / sub / f"{case}.nii.gz", o / sub / f"{case}.nii.gz")
    (o / "LICENSE.txt").write_text(HIPPO_LICENSE)
    write_json({**HIPPO_DATASET, "numTraining": len(cases)}, o / "dataset.json")
    write_json(kfold_splits(cases), o / "splits_final.json")


def write_array(array: np.ndarray, spacing, origin, path: Path) -> None:
    """An (X, Y, Z) array as a compressed NIfTI file (ITK's identity direction: LPS)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True, 9)


def build_atrium_phantom(out: Path, n: int = PHANTOM_CASES) -> None:
    from thorax import make_subject  # data/thorax.py, beside this file

    o = out / "atrium_phantom"
    cases = [f"atrium_{i:03d}" for i in range(n)]
    for i, case in enumerate(cases):
        s = make_subject(PHANTOM_SEED + i)
        for sub, array in (("imagesTr", s.image), ("labelsTr", s.label), ("anatomyTr", s.anatomy)):
            write_array(array, s.spacing, s.origin, o / sub / f"{case}.nii.gz")
    (o / "LICENSE.txt").write_text(PHANTOM_LICENSE)
    write_json({**PHANTOM_DATASET, "numTraining": n}, o / "dataset.json")
    write_json(kfold_splits(cases), o / "splits_final.json")


def check_source(src: Path) -> None:
    """Fail with one line, before anything is deleted, when a source folder is missing."""
    need = ("mni152", "pyradiomics", "hippocampus/imagesTr", "hippocampus/labelsTr")
    missing = [n for n in need if not (src / n).is_dir()]
    if missing:
        sys.exit(f"build_demo: --source {src} lacks {', '.join(f'{n}/' for n in missing)}")


def list_files(out: Path, many: int = 10) -> None:
    """Print each file with its size; folders holding more than ``many`` files as one line."""
    for root, _, files in sorted(os.walk(out)):
        paths = [Path(root) / f for f in sorted(files)]
        if len(paths) > many:
            mb = sum(p.stat().st_size for p in paths) / 1e6
            print(f"{Path(root).relative_to(out)}/  {len(paths)} files  {mb:.2f} MB")
            continue
        for p in paths:
            print(f"{p.relative_to(out)}  {p.stat().st_size / 1e6:.2f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="../shared/data", help="mni152/, pyradiomics/, hippocampus/ here")
    ap.add_argument("--out", default=str(Path(__file__).parent / "demo"))
    ap.add_argument("--slab", type=int, default=32, help="axial slices per slab")
    ap.add_argument("--only", choices=BUILDS, nargs="+", default=list(BUILDS), help="rebuild these only")
    args = ap.parse_args()
    src, out = Path(args.source), Path(args.out)
    if set(args.only) - {"atrium_phantom"}:
        check_source(src)
    builders = {"mni152": lambda: build_mni(src, out, args.slab), "pyradiomics": lambda: build_pyradiomics(src, out),
                "hippocampus": lambda: build_hippocampus(src, out), "atrium_phantom": lambda: build_atrium_phantom(out)}
    for name in args.only:
        shutil.rmtree(out / name, ignore_errors=True)
        builders[name]()
    list_files(out)


if __name__ == "__main__":
    main()
