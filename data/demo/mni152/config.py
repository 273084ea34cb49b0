"""The second demo: brain tissue (grey / white matter) on the MNI152 template's slabs.

    python train_seg.py --config data/demo/mni152/config.py

Everything is ``hparam.py``'s default except the data (this folder: slabs 0, 2, 4 train, 1, 3
validate), the class names, the output folder, the number of 3D iterations (1,000: longer
overfits the three training slabs of this single brain) and the coarse head: on these slabs the
DeepLab head is better than the default U-Net head (1,000 iterations: mean Dice 0.877 / Boundary IoU
0.526 against 0.850 / 0.461; docs/data.md, "What to expect from each demo"), the reverse of the
hippocampus.
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
    cfg.model.head = "deeplab"
    return cfg
