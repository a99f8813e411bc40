"""The one exception hierarchy of layerfs.

    LayerfsError                 anything layerfs refuses or fails at, with a one-line message
    ├── UsageError               bad arguments or options (exit code 2)
    ├── MountError               a mount cannot be made or ended
    ├── ReferenceError_          an image reference that does not parse
    ├── StoreError               the store is missing, locked or inconsistent
    │   └── NotFoundError        an image, layer or container that is not there
    ├── LayerError               a layer tarball that is malformed or hostile
    ├── DigestError              content whose digest is not the one promised
    ├── RegistryError            a registry refused, failed or could not be reached
    ├── DownloadError            a URL (`layerfs import URL`) that could not be fetched whole
    ├── DockerfileError          a Dockerfile that does not parse (`FILE:LINE: why`), exit 2
    └── BuildError               a build step that failed (a RUN exited non-zero, a COPY source)

Messages read "what: why" and name the thing first. Only `cli` prints them. Filesystem
operations do not use this tree: they raise `OSError` with the errno the kernel's overlayfs
would answer.
"""

from __future__ import annotations


class LayerfsError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(LayerfsError):
    exit_code = 2


class MountError(LayerfsError):
    pass


class ReferenceError_(LayerfsError):
    exit_code = 2


class StoreError(LayerfsError):
    pass


class NotFoundError(StoreError):
    pass


class LayerError(LayerfsError):
    pass


class DigestError(LayerfsError):
    pass


class RegistryError(LayerfsError):
    pass


class DownloadError(LayerfsError):
    pass


class DockerfileError(LayerfsError):
    """The message starts with `FILE:LINE:` of the instruction at fault."""

    exit_code = 2


class BuildError(LayerfsError):
    pass
