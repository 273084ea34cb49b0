"""The large-field demo: a synthetic left atrium in a view of the heart's blood pools.

    python train_seg.py --config data/demo/atrium_phantom/config.py

Everything is ``hparam.py``'s default except the data (this folder: its ``dataset.json`` names the
class, its ``splits_final.json`` holds five folds of 32 training / 8 validation subjects) and the
output folder.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository's hparam.py
from hparam import Config  # noqa: E402


def get_config() -> Config:
    cfg = Config()
    cfg.data.root = "."  # relative to this file's folder
    cfg.train.output_dir = "runs/atrium_phantom"
    return cfg
