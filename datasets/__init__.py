"""Training data: case discovery and checks, preprocessed case arrays, 2D and 3D patch streams.

``seg.train`` uses::

    cases = find_cases(images_dir, labels_dir, pattern)    # paired by name, nnU-Net layout works
    train, val = split_cases(cases, val_fraction, seed)     # when there is no validation folder
    check_case(case, num_classes, label_remap)             # one-line DataError naming the file
    arrays = load_case_arrays(case, data_cfg)              # a case, preprocessed (image and label resampled)
    arrays = load_validation_case(case, data_cfg)          # validation: the label on the file's grid
    batches = build_train_loader(train, data_cfg, batch_size, seed)  # endless, seed-determined
"""
from datasets.arrays import CaseArrays, load_case_arrays, load_validation_case, remap_labels
from datasets.cases import Case, find_cases, kfold_split, split_cases, split_from_file
from datasets.checks import check_case
from datasets.loader import build_train_loader
from datasets.sampling import ForegroundSampler

__all__ = ["Case", "CaseArrays", "ForegroundSampler", "build_train_loader", "check_case", "find_cases",
           "kfold_split", "load_case_arrays", "load_validation_case", "remap_labels", "split_cases", "split_from_file"]
