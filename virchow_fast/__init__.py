"""virchow-fast: fast DINOv2 / Virchow 2 pretraining for pathology foundation models."""
__version__ = "0.1.0"
