"""layerfs: container images as a FUSE copy-on-write filesystem."""

from layerfs import build

__version__ = "0.1.0"

build.select()  # before any other module of the package is imported: which build runs
