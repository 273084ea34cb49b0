"""From image files to label maps: preprocessing, sliding-window inference and geometry-true output.

``Predictor`` wraps a trained model (an ``InferenceBundle`` from ``seg.checkpoint``) and applies the
checkpoint's own preprocessing: intensity normalisation and, when a target spacing is set, resampling
to it.  The network's logits are resampled back to the input grid *before* the argmax (linear
interpolation of logits, not nearest-neighbour of labels), so the output has exactly the input's
size, spacing, origin and direction.  Cases, their names and their files are found and read by
``seg.io`` (the reader training and evaluation use), DICOM series included; a DICOM series' output
is a DICOM Segmentation object (``<case>.dcm``, referencing the series) unless another format is
asked for.  ``predict_folder`` runs a whole folder, skips outputs that exist, and turns a bad file
into a one-line failure while the other cases go on;
outputs that would collide (two inputs, one output name; an output over an input) are refused
before anything is written.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from seg import io
from seg.checkpoint import load_for_inference
from seg.dataset_json import read_dataset_json
from seg.errors import DataError, UserError
from seg.export import load_export
from seg.files import write_bytes_atomic
from seg.inference import DEFAULT_BATCH_SIZE, DEFAULT_BLEND, DEFAULT_OVERLAP, predict_image
from seg.postprocess import Postprocessing
from seg.preprocess import check_intensities, normalize, resample, target_grid

logger = logging.getLogger(__name__)

#: beside the probabilities: the class names and label values of their channels (``seg.ensemble``)
CLASSES_JSON = "classes.json"
#: 'same': the input's format (DICOM-SEG for a DICOM series); 'dicom-seg': DICOM inputs only
OUTPUT_FORMATS = ("same", "nii.gz", "nii", "nrrd", "mha", "seg.nrrd", "dicom-seg")
_CHUNK = 16  # spatial slices per chunk in argmax/softmax over large volumes


@dataclasses.dataclass
class PredictionReport:
    """Outcome of ``predict_folder``.

    Attributes:
        successes: (input file, written output) pairs.
        skipped: (input file, existing output) pairs left alone (no ``overwrite``).
        failures: (input file, one-line error message) pairs.
        cases: names of the cases that have an output (written or skipped).
    """

    successes: list[tuple[Path, Path]] = dataclasses.field(default_factory=list)
    skipped: list[tuple[Path, Path]] = dataclasses.field(default_factory=list)
    failures: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    cases: list[str] = dataclasses.field(default_factory=list)


class Predictor:
    """Segment arrays and files with a trained model.

    Args:
        bundle: from ``seg.checkpoint.load_for_inference`` (model in eval mode, patch size,
            preprocessing, class names, ...), or any object with the same fields.
        overlap: sliding-window overlap in [0, 1).
        tta: mirror test-time augmentation: True mirrors the axes mirrored in training (all axes for
            checkpoints that do not say), or the given spatial axes.
        batch_size: windows per network call.
        blend: 'gaussian', 'hann' or 'constant'.
        output_device: where logits are accumulated (CPU keeps GPU memory to one batch).
        progress: per-window progress bar inside each case.
        postprocessing: applied to the label maps ``predict_file`` writes (``seg.postprocess``).
    """

    def __init__(self, bundle, overlap: float = DEFAULT_OVERLAP, tta: bool | Sequence[int] = False,
                 batch_size: int = DEFAULT_BATCH_SIZE, blend: str = DEFAULT_BLEND,
                 output_device: str | torch.device = "cpu", progress: bool = False,
                 postprocessing: Postprocessing | None = None) -> None:
        self.bundle = bundle
        self.postprocessing = postprocessing
        self.model = bundle.model.eval()
        self.spatial_dims = int(bundle.spatial_dims)
        self.patch_size = tuple(int(p) for p in bundle.patch_size)
        self.num_classes = len(bundle.class_names)
        #: the label value written for each class index (the training files' values)
        self.label_values = tuple(getattr(bundle, "label_values", None) or range(self.num_classes))
        if tta is True and getattr(bundle, "mirror_axes", None) is not None:
            tta = tuple(bundle.mirror_axes)  # the axes the model was trained mirrored along
        self.window_kwargs = dict(overlap=overlap, tta=tta, batch_size=batch_size, blend=blend,
                                  output_device=output_device, progress=progress)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        unsafe_load: bool = False, **kwargs) -> "Predictor":
        """Load ``path`` and wrap it: a checkpoint file with ``seg.checkpoint.load_for_inference``
        (``unsafe_load``: admit a file that needs full unpickling, which runs code stored in it), a
        folder as an export of ``python -m seg.export`` with ``seg.export.load_export`` (its
        TorchScript network is a program: it loads only with ``unsafe_load``)."""
        if Path(path).is_dir():
            return cls(load_export(path, device, unsafe_load), **kwargs)
        return cls(load_for_inference(path, device, unsafe_load), **kwargs)

    def check_input(self, image: np.ndarray, path: str | os.PathLike | None = None) -> None:
        """Raise a one-line DataError when ``image`` (C, *S) cannot go through this model."""
        sd, c = image.ndim - 1, image.shape[0]
        if c != self.bundle.in_channels:
            raise DataError(f"has {c} channel(s) but the model expects {self.bundle.in_channels}", path)
        if sd not in (2, 3) or (self.spatial_dims == 3 and sd != 3):
            raise DataError(f"has {sd} spatial axes (shape {image.shape[1:]}) but the model is "
                            f"{self.spatial_dims}D", path)
        check_intensities(image, [self.bundle.preprocessing.scheme(i) for i in range(c)], path)

    def predict_logits(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Blended logits of a normalised (C, *S) image on its own grid: (K, *S) float32."""
        return predict_image(image, self.model, self.spatial_dims, self.patch_size, self.bundle.slice_axis,
                             **self.window_kwargs)

    def predict_array(self, image: np.ndarray, spacing: Sequence[float] | None = None,
                      return_probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Segment one image.

        Args:
            image: (C, X, Y, Z) or (C, X, Y) raw intensities.
            spacing: voxel size per spatial axis (needed when the checkpoint has a target spacing).
            return_probabilities: also return softmax probabilities.

        Returns:
            (labels, probabilities): labels (X, Y, Z) / (X, Y) uint8 (uint16 above 256 classes);
            probabilities (K, *S) float32 on the input grid, or None.
        """
        return _labels_and_probabilities(self.input_grid_logits(image, spacing), return_probabilities)

    def input_grid_logits(self, image: np.ndarray, spacing: Sequence[float] | None = None) -> torch.Tensor:
        """Logits (K, *S) of a raw (C, *S) image on its own grid: normalised, resampled to the
        checkpoint's spacing for the network, the logits resampled back (``predict_array``)."""
        self.check_input(image)
        shape = tuple(image.shape[1:])
        x = normalize(image, self.bundle.preprocessing)
        net_shape = self._network_shape(shape, spacing)
        if net_shape != shape:
            logger.debug("resampling %s -> %s for the network", shape, net_shape)
            x = resample(x, net_shape, mode="linear")
        logits = self.predict_logits(x)
        del x
        return to_input_grid(logits, shape)

    def _network_shape(self, shape: tuple[int, ...], spacing: Sequence[float] | None) -> tuple[int, ...]:
        """Grid size at the checkpoint's target spacing (axes it does not cover keep their size)."""
        target = self.bundle.preprocessing.target_spacing
        if target is None:
            return shape
        if spacing is None:
            raise ValueError("this checkpoint resamples to a target spacing: pass the image spacing")
        return target_grid(shape, spacing, target, self.bundle.slice_axis)

    def predict_file(self, in_paths: str | os.PathLike | Sequence[str | os.PathLike],
                     out_path: str | os.PathLike, probabilities_path: str | os.PathLike | None = None
                     ) -> Path:
        """Segment one case and write its label map with the input's geometry.

        Args:
            in_paths: the image file, or one file per channel (nnU-Net ``_0000``, ``_0001``, ...),
                or the files of a DICOM series.
            out_path: label map to write (format from the extension; ``.dcm``: a DICOM-SEG over the
                input series, one segment per foreground class); written atomically.
            probabilities_path: where to write the probabilities (float32, K channels), if wanted.
        """
        image, meta = io.read_case(in_paths)
        self.check_input(image, meta.path)
        labels, probs = self.predict_array(image, meta.spacing, probabilities_path is not None)
        if probs is not None:
            io.write_image(probabilities_path, probs, meta)
        return write_labels(out_path, labels, meta, self.bundle.class_names, self.label_values,
                            self.postprocessing)


def write_labels(path: str | os.PathLike, labels: np.ndarray, meta: io.ImageMeta, class_names: Sequence[str],
                 label_values: Sequence[int], postprocessing: Postprocessing | None = None) -> Path:
    """Write class indices ``labels`` as the training files' ``label_values``, postprocessed when
    ``postprocessing`` is given, with ``meta``'s geometry (``seg.io.write_label``; ``class_names``
    name the segments of formats that hold names)."""
    values = tuple(label_values)
    if values != tuple(range(len(values))):  # class indices -> the training files' values
        labels = np.asarray(values)[labels]
    if postprocessing is not None:
        labels = postprocessing.apply(labels)
    segments = list(zip(class_names[1:], values[1:]))
    return io.write_label(path, labels, meta, num_classes=max(values) + 1, segments=segments)


def to_input_grid(logits: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(K, *G) logits on the network's grid resampled (linearly) to the input's grid ``shape``, before
    any argmax: what inference writes and validation scores (``datasets.load_validation_case``)."""
    if tuple(logits.shape[1:]) == tuple(shape):
        return logits
    return resample(logits, tuple(shape), mode="linear")


def labels_from_logits(logits: torch.Tensor) -> np.ndarray:
    """Class indices of (K, *S) logits (chunked argmax; one channel: the sign of a sigmoid logit)."""
    k = logits.shape[0]
    labels = np.empty(tuple(logits.shape[1:]), dtype=io.label_dtype(np.zeros(0), max(k, 2)))
    for i in range(0, logits.shape[1], _CHUNK):
        chunk = logits[:, i:i + _CHUNK]
        labels[i:i + _CHUNK] = ((chunk[0] > 0) if k == 1 else chunk.argmax(0)).numpy()
    return labels


def labels_from_probabilities(probabilities: torch.Tensor) -> np.ndarray:
    """Class indices of (K, *S) probabilities (argmax; one channel: foreground above 0.5)."""
    return labels_from_logits(probabilities - 0.5 if probabilities.shape[0] == 1 else probabilities)


def probabilities_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the classes of (K, *S) logits, in place and chunked (one channel: sigmoid)."""
    for i in range(0, logits.shape[1], _CHUNK):
        chunk = logits[:, i:i + _CHUNK]
        chunk.copy_(torch.sigmoid(chunk) if logits.shape[0] == 1 else torch.softmax(chunk, 0))
    return logits


def _labels_and_probabilities(logits: torch.Tensor, with_probs: bool
                              ) -> tuple[np.ndarray, np.ndarray | None]:
    """Argmax (and then softmax, in place) of (K, *S) logits."""
    labels = labels_from_logits(logits)
    return labels, (probabilities_(logits).numpy() if with_probs else None)


def read_probability_classes(folder: str | os.PathLike) -> tuple[list[str], list[int]]:
    """(class names, label values) of the channels of a probability folder (its ``classes.json``;
    without one, ``class_<k>`` and the channel indices of its first file).

    Raises:
        DataError: a folder without probability files, or a malformed ``classes.json``.
    """
    path = Path(folder) / CLASSES_JSON
    if path.is_file():
        classes = io.read_json(path, CLASSES_JSON)
        names, values = (classes.get(k) if isinstance(classes, dict) else None for k in ("class_names", "label_values"))
        if not (isinstance(names, list) and isinstance(values, list) and len(names) == len(values) >= 2
                and all(isinstance(v, int) and v >= 0 for v in values)):
            raise DataError("needs 'class_names' and 'label_values', two lists of one entry per channel", path)
        return [str(n) for n in names], values
    files = sorted(io.label_files(folder).values())
    if not files:
        raise DataError("holds no probability files", folder)
    k = io.read_image(files[0])[0].shape[0]
    logger.info("%s: no %s, channels taken as label values 0..%d", folder, CLASSES_JSON, k - 1)
    return [f"class_{i}" for i in range(k)], list(range(k))


def check_suffix(suffix: str) -> str:
    """``suffix`` when it only extends a file name inside the output folder.

    Raises:
        UserError: a path separator ('/', '\\') or '..' (``'/../../x'`` would write outside the
            output folder).
    """
    if any(c and c in suffix for c in ("/", "\\", os.sep, os.altsep)) or ".." in suffix:
        raise UserError(f"--suffix {suffix!r} must only extend the output file names (e.g. _seg): "
                        "no path separators, no '..'")
    return suffix


def output_path(case: io.Case, out_dir: str | os.PathLike, suffix: str = "", fmt: str = "same",
                probabilities: bool = False) -> Path:
    """Output file of a case: the case name (``seg.io``: a channel suffix removed) + suffix, in ``fmt``.

    A DICOM series' 'same' is 'dicom-seg' (``.dcm``).  Probabilities go to ``out_dir/probabilities/``
    (as .nii.gz for PNG and DICOM inputs, whose formats cannot hold them), so ``out_dir`` holds label
    maps only.

    Raises:
        UserError: an unknown format, 'dicom-seg' for a case that is not a DICOM series, or a
            ``suffix`` that is not one (``check_suffix``).
    """
    check_suffix(suffix)
    if fmt not in OUTPUT_FORMATS:
        raise UserError(f"unknown output format {fmt!r}; choose from {', '.join(OUTPUT_FORMATS)}")
    if fmt == "dicom-seg" and not case.is_dicom:
        raise UserError("is not a DICOM series: --format dicom-seg writes DICOM Segmentation objects over "
                        "DICOM inputs only; choose another format", case.image)
    if case.is_dicom and fmt in ("same", "dicom-seg"):
        ext = ".dcm"
    else:
        ext = io.split_extension(case.image)[1] if fmt == "same" else "." + fmt
    if probabilities:
        out_dir, ext = Path(out_dir) / "probabilities", (".nii.gz" if ext.lower() in (".png", ".dcm") else ext)
    return Path(out_dir) / f"{case.name}{suffix}{ext}"


def check_outputs(cases: Sequence[io.Case], out_dir: str | os.PathLike, suffix: str = "",
                  fmt: str = "same", save_probabilities: bool = False,
                  input_dirs: Sequence[Path] = ()) -> None:
    """Refuse outputs that would collide, before anything is written.

    Raises:
        UserError: ``out_dir`` is one of ``input_dirs``; an output (label map or probabilities)
            would be an input file; two cases map to the same output (``a.nrrd`` and ``a.mha``
            with ``fmt='nii.gz'``).  The message names the files.
    """
    out_dir = Path(out_dir)
    for folder in input_dirs:
        if folder.resolve() == out_dir.resolve():
            raise UserError(f"is the input folder {folder}: write the outputs to another folder", out_dir)
    inputs = {p.resolve(): p for case in cases for p in case.images}
    owners: dict[Path, Path] = {}
    for case in cases:
        outs = [output_path(case, out_dir, suffix, fmt)]
        if save_probabilities:
            outs.append(output_path(case, out_dir, suffix, fmt, probabilities=True))
        for out in outs:
            key = out.resolve()
            if key in inputs:
                raise UserError(f"the output of {case.image} would overwrite the input {inputs[key]}: "
                                "write the outputs to another folder", out)
            if key in owners:
                raise UserError(f"{owners[key]} and {case.image} would both be written to {out}: rename one, "
                                "or keep them apart with --format / --suffix")
            owners[key] = case.image


def dataset_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[Path], str]:
    """Inputs with nnU-Net dataset folders resolved, and the file pattern.

    A folder holding a ``dataset.json`` stands for its ``imagesTs/``; the images of ``imagesTs/``
    (or ``imagesTr/``) of such a folder are its ``file_ending`` files.  Other inputs are kept, with
    pattern '*'.

    Raises:
        DataError: a bad ``dataset.json``, a dataset folder without ``imagesTs/``, or inputs from
            datasets with different file endings.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    out, patterns = [], set()
    for item in map(Path, items):
        if item.is_dir() and (item / "dataset.json").is_file():
            patterns.add(read_dataset_json(item / "dataset.json").pattern)
            if not (item / "imagesTs").is_dir():
                raise DataError("is an nnU-Net dataset folder (dataset.json) without imagesTs/: pass the "
                                "folder of the images to segment", item)
            item = item / "imagesTs"
        elif item.is_dir() and item.name in ("imagesTs", "imagesTr") and (item.parent / "dataset.json").is_file():
            patterns.add(read_dataset_json(item.parent / "dataset.json").pattern)
        out.append(item)
    if len(patterns) > 1:
        raise DataError(f"inputs from nnU-Net datasets with different file endings ({', '.join(sorted(patterns))}): "
                        "segment them in separate runs", items[0])
    return out, (patterns.pop() if patterns else "*")


def checked_cases(inputs: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  suffix: str = "", fmt: str = "same", save_probabilities: bool = False
                  ) -> list[io.Case]:
    """The cases of ``inputs`` (``dataset_inputs``, then ``seg.io.image_cases``) once
    ``check_outputs`` has found no collision (UserError otherwise)."""
    items, pattern = dataset_inputs(inputs)
    cases = io.image_cases(items, pattern)
    check_outputs(cases, out_dir, suffix, fmt, save_probabilities,
                  input_dirs=[p for p in items if p.is_dir()])
    return cases


def predict_folder(predictor: Predictor, inputs: str | os.PathLike | Sequence[str | os.PathLike],
                   out_dir: str | os.PathLike, suffix: str = "", fmt: str = "same",
                   overwrite: bool = False, save_probabilities: bool = False,
                   fail_fast: bool = False, progress: bool = True) -> PredictionReport:
    """Segment every case of ``inputs`` into ``out_dir``.

    Args:
        predictor: the model wrapper.
        inputs: a folder, an image file, or a list of files.
        out_dir: output folder (created).
        suffix: appended to each case name (``brain1`` -> ``brain1_seg.nrrd`` with ``_seg``).
        fmt: 'same' (the input's format; DICOM-SEG for a DICOM series) or one of ``OUTPUT_FORMATS``.
        overwrite: redo cases whose output exists (otherwise they are skipped).
        save_probabilities: also write the probabilities to ``out_dir/probabilities/``.
        fail_fast: re-raise the first failure instead of going on.
        progress: tqdm bar over cases.

    Returns:
        A ``PredictionReport`` with successes, skipped cases and failures (one line each).

    Raises:
        UserError: no inputs, or outputs that would collide (``check_outputs``; nothing written).
        Exception: anything but a ``UserError`` in a case is a bug and stops the run.
    """
    cases = checked_cases(inputs, out_dir, suffix, fmt, save_probabilities)
    if save_probabilities:
        classes = {"class_names": list(predictor.bundle.class_names), "label_values": list(predictor.label_values)}
        write_bytes_atomic(Path(out_dir) / "probabilities" / CLASSES_JSON, json.dumps(classes, indent=2) + "\n")
    report = PredictionReport()
    for case in tqdm(cases, desc="cases", unit="case", disable=not progress):
        out = output_path(case, out_dir, suffix, fmt)
        if out.exists() and not overwrite:
            logger.info("%s exists, skipped (use overwrite to redo it)", out)
            report.skipped.append((case.image, out))
            report.cases.append(case.name)
            continue
        prob = output_path(case, out_dir, suffix, fmt, probabilities=True) if save_probabilities else None
        try:
            report.successes.append((case.image, predictor.predict_file(case.images, out, prob)))
            report.cases.append(case.name)
        except UserError as exc:  # a bad file must not stop the others (a bug does)
            if fail_fast:
                raise
            msg = " ".join(str(exc).split())
            logger.error("%s", msg)
            logger.debug("traceback for %s", case.image, exc_info=True)
            report.failures.append((case.image, msg))
    return report
