"""layerfs: container images as a FUSE copy-on-write filesystem."""

__version__ = "0.1.0"
