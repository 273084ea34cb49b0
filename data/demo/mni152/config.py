"""The second demo: brain tissue (grey / white matter) on the MNI152 template's slabs.

    python train_seg.py --config data/demo/mni152/config.py

Everything is ``hparam.py``'s default except the data (this folder: slabs 0, 2, 4 train, 1, 3
validate), the class names, the output folder and the number of 3D iterations (1,000: longer
overfits the three training slabs of this single brain).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository's hparam.py
from hparam import Config  # noqa: E402


def get_config() -> Config:
    cfg = Config()
    cfg.data.root = "."  # relative to this file's folder
    cfg.data.class_names = ["background", "grey_matter", "white_matter"]
    cfg.train.output_dir = "runs/mni152"
    cfg.train.iterations_3d = 1000
    return cfg
