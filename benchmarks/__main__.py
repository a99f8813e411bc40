"""Command line: `python -m benchmarks overlay|images [--runs N] [--quick] [--out DIR] ...`."""

from __future__ import annotations

import argparse
import sys

from benchmarks import images, overlay


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    overlay.add_arguments(
        commands.add_parser("overlay", help="copy-on-write benchmark against fuse-overlayfs, "
                            "the kernel's overlayfs and a plain directory")
    )
    images.add_arguments(
        commands.add_parser("images", help="import, load, mount, commit and pull against umoci, "
                            "skopeo, fuse-overlayfs and the kernel's overlayfs")
    )
    args = parser.parse_args(argv)
    return images.main(args) if args.command == "images" else overlay.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
