"""The build: everything is in pyproject.toml but the compiled hot path.

The modules `layerfs/build.py` lists are compiled with mypyc into extension modules beside
their sources. `LAYERFS_PURE=1` at install time skips that, and so does a build that fails
(no C compiler, say): the extensions are optional, and layerfs then runs the sources.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

from setuptools import setup


def compiled_modules() -> list[str]:
    """`COMPILED` of layerfs/build.py, read without importing the package."""
    tree = ast.parse(Path(__file__).with_name("layerfs").joinpath("build.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "COMPILED":
            return list(ast.literal_eval(node.value))
    raise RuntimeError("layerfs/build.py: no COMPILED list")


def extensions() -> list[object]:
    if os.environ.get("LAYERFS_PURE") == "1":
        return []
    from mypyc.build import mypycify

    modules = mypycify(compiled_modules(), opt_level="3")
    for extension in modules:
        extension.optional = True  # a failed compile leaves the sources to run
    return list(modules)


setup(ext_modules=extensions())
