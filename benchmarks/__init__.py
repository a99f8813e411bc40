"""Benchmarks for layerfs, run as `python -m benchmarks NAME` (see benchmarks/README.md).

`overlay`: the copy-on-write benchmark comparing layerfs-overlay, fuse-overlayfs, the kernel's
overlayfs and a plain directory over the same generated layers.
`images`: import, load, mount, commit and pull of a Debian image, against umoci, skopeo,
fuse-overlayfs and the kernel's overlayfs.
"""
