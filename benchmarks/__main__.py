"""Command line: `python -m benchmarks [all|overlay|images|syscalls|build|rootless] [--quick]
[--runs N] [--skip SYSTEM] [--only ROW] [--out DIR] ...`; without a command, `all` (both suites
and one summary)."""

from __future__ import annotations

import argparse
import sys

from benchmarks import all_suites, builds, images, overlay, rootless, syscall_counts

COMMANDS = ("all", "overlay", "images", "syscalls", "build", "rootless")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    all_suites.add_arguments(
        commands.add_parser("all", help="the overlay suite, then the images suite, with one "
                            "combined summary (the default)")
    )
    overlay.add_arguments(
        commands.add_parser("overlay", help="copy-on-write benchmark against fuse-overlayfs, "
                            "the kernel's overlayfs and a plain directory")
    )
    images.add_arguments(
        commands.add_parser("images", help="import, load, mount, commit, pull and dpkg -i against "
                            "umoci, skopeo, fuse-overlayfs and the kernel's overlayfs")
    )
    syscall_counts.add_arguments(
        commands.add_parser("syscalls", help="syscalls per copy-up, create, chmod and unlink "
                            "in the daemons of layerfs-overlay and fuse-overlayfs (strace)")
    )
    builds.add_arguments(
        commands.add_parser("build", help="the Dockerfile corpus built cold, fully cached and "
                            "after a one-line change, by layerfs build and buildah bud")
    )
    rootless.add_arguments(
        commands.add_parser("rootless", help="the overlay rows users feel, run by an "
                            "unprivileged user: layerfs-overlay against fuse-overlayfs")
    )
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["all", *argv]  # no command: `all`, with whatever options were given
    args = parser.parse_args(argv)
    if args.command == "images":
        return images.main(args)
    if args.command == "build":
        return builds.main(args)
    if args.command == "rootless":
        return rootless.main(args)
    if args.command == "syscalls":
        return syscall_counts.main(args)
    if args.command == "overlay":
        return overlay.main(args)
    return all_suites.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
