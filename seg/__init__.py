"""Boundary-first medical image segmentation: backbones, coarse heads and PointRend, 2D and 3D."""
__version__ = "0.1.0"
