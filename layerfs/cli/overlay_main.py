"""`layerfs-overlay`: a drop-in for fuse-overlayfs's command line.

Two call forms, as fuse-overlayfs accepts them:

    layerfs-overlay [-f] -o lowerdir=L1:L2,upperdir=U,workdir=W MNT
    layerfs-overlay SRC MNT -o rw,dev,suid,lowerdir=...      (how mount.fuse3 calls it)

so it also serves as `mount -t fuse.layerfs-overlay SRC MNT -o ...` and as podman's
`mount_program`. Generic mount options are accepted as fuse-overlayfs accepts them; an unknown
option is refused before anything is mounted.
"""

from __future__ import annotations

import sys

from layerfs import __version__, build
from layerfs.errors import LayerfsError, UsageError
from layerfs.fuse import idmap
from layerfs.fuse.mount import OverlaySpec, default_fuse_options, mount_overlay

USAGE = "usage: layerfs-overlay [-f] -o lowerdir=L1:L2[,upperdir=U,workdir=W] MOUNTPOINT"

# Options that fuse-overlayfs accepts and that change nothing here: mount(8) generics
# (their effect on the mount is the kernel's), SELinux labels, and tuning knobs of its own.
_IGNORED = {
    "rw",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nodiratime",
    "diratime",
    "lazytime",
    "nolazytime",
    "sync",
    "async",
    "dirsync",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "defaults",
    "silent",
    "loud",
    "iversion",
    "noiversion",
    "mand",
    "nomand",
    "static_nlink",
    "noacl",
    "xattr_permissions",
    "plugins",
    "threaded",
    "timeout",
    "redirect_dir",
    "index",
    "xino",
    "metacopy",
    "volatile_dirs",
    "max_idle_threads",
    "clone_fd",
    "writeback",
    "context",
    "fscontext",
    "defcontext",
    "rootcontext",
    "seclabel",
    "nfs_export",
    "debug",
    "allow_root",
    "fast_ino",
}
_FUSE_FLAGS = {"dev", "nodev", "suid", "nosuid", "allow_other", "default_permissions", "ro"}


def parse_args(argv: list[str]) -> tuple[OverlaySpec, bool]:
    """The mount request and whether to stay in the foreground (UsageError if malformed)."""
    options: list[str] = []
    positional: list[str] = []
    foreground = False
    args = iter(argv)
    for arg in args:
        if arg == "-o":
            value = next(args, None)
            if value is None:
                raise UsageError("-o: needs a value")
            options.append(value)
        elif arg.startswith("-o") and len(arg) > 2:
            options.append(arg[2:])
        elif arg in ("-f", "--foreground") or arg in ("-d", "--debug"):
            foreground = True
        elif arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        elif arg in ("-V", "--version"):
            print(f"layerfs-overlay {__version__}, {build.description()}")
            raise SystemExit(0)
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"{arg}: unknown flag")
        else:
            positional.append(arg)
    if len(positional) == 2:
        positional = positional[1:]  # mount.fuse3 passes the source first: unused
    if len(positional) != 1:
        raise UsageError(USAGE)
    return _spec(positional[0], options), foreground


def _spec(mountpoint: str, option_args: list[str]) -> OverlaySpec:
    values: dict[str, str] = {}
    flags: set[str] = set()
    for arg in option_args:
        for item in filter(None, arg.split(",")):
            key, sep, value = item.partition("=")
            if key in ("lowerdir", "upperdir", "workdir", "fsname", "fsync", "passthrough", "log",
                       "uidmapping", "gidmapping", "squash_to_uid", "squash_to_gid"):
                if not sep:
                    raise UsageError(f"{key}: needs a value")
                values[key] = value
            elif key in _FUSE_FLAGS:
                flags.add(key)
            elif key in ("volatile",):
                values["fsync"] = "0"
            elif key in ("userxattr", "squash_to_root"):
                values[key] = "1"
            elif key not in _IGNORED:
                raise UsageError(f"{key}: unknown option")
    if "lowerdir" not in values:
        raise UsageError("lowerdir: missing (-o lowerdir=L1:L2)")
    lowers = tuple(p for p in values["lowerdir"].split(":") if p)
    fuse_options = default_fuse_options()
    for flag in flags:
        negated = {"nodev": "dev", "nosuid": "suid"}.get(flag)
        if negated is not None:
            fuse_options.discard(negated)
        fuse_options.add(flag)
    try:
        ids = idmap.from_options(
            uidmapping=values.get("uidmapping"), gidmapping=values.get("gidmapping"),
            squash_to_root="squash_to_root" in values,
            squash_to_uid=values.get("squash_to_uid"), squash_to_gid=values.get("squash_to_gid"),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    passthrough = values.get("passthrough", "1")
    if passthrough not in ("0", "1", "all"):
        raise UsageError(f"passthrough={passthrough}: 0, 1 or all")
    upper = values.get("upperdir")
    if "ro" in flags:
        upper = None
    return OverlaySpec(
        lowers=lowers,
        upper=upper,
        work=values.get("workdir") if upper is not None else None,
        mountpoint=mountpoint,
        fsname=values.get("fsname", "layerfs-overlay"),
        fuse_options=frozenset(fuse_options - {"ro"}),
        sync_copy_up=values.get("fsync", "1") != "0",
        passthrough=passthrough != "0",
        passthrough_lowers=passthrough == "all",
        log_file=values.get("log"),
        userxattr="userxattr" in values,
        ids=ids,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        spec, foreground = parse_args(sys.argv[1:] if argv is None else argv)
        mount_overlay(spec, foreground=foreground)
    except LayerfsError as exc:
        print(f"layerfs-overlay: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
