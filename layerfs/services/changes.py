"""Dockerfile instructions applied to an image config: `import -c` and `commit -c`.

Accepted, as docker accepts them there: CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, USER, VOLUME,
WORKDIR (also ONBUILD and STOPSIGNAL, stored as given). CMD and ENTRYPOINT take the JSON form
or the shell form (wrapped in `/bin/sh -c`). Anything else is refused with the reason.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from layerfs.errors import UsageError


def _split_args(value: str, what: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise UsageError(f"{what}: not a JSON array: {exc}") from None
        if not isinstance(parsed, list) or not all(isinstance(a, str) for a in parsed):
            raise UsageError(f"{what}: must be a JSON array of strings")
        return parsed
    return ["/bin/sh", "-c", value]


def _pairs(value: str, what: str) -> list[tuple[str, str]]:
    """KEY=VALUE pairs (quotes allowed), or the old single `KEY VALUE` form."""
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None
    if words and "=" not in words[0]:
        key, _, rest = value.strip().partition(" ")
        return [(key, rest.strip())]
    pairs = []
    for word in words:
        key, eq, val = word.partition("=")
        if not eq or not key:
            raise UsageError(f"{what}: {word!r} is not KEY=VALUE")
        pairs.append((key, val))
    return pairs


def apply_changes(config: dict[str, Any], changes: list[str]) -> None:
    """Apply `changes` to the `config` object of an image config, in order."""
    for change in changes:
        instruction, _, value = change.strip().partition(" ")
        keyword = instruction.upper()
        what = f"{change!r}"
        if keyword == "CMD":
            config["Cmd"] = _split_args(value, what)
        elif keyword == "ENTRYPOINT":
            config["Entrypoint"] = _split_args(value, what)
        elif keyword == "ENV":
            env = [e for e in config.get("Env") or [] if isinstance(e, str)]
            for key, val in _pairs(value, what):
                env = [e for e in env if e.partition("=")[0] != key] + [f"{key}={val}"]
            config["Env"] = env
        elif keyword == "LABEL":
            labels = dict(config.get("Labels") or {})
            labels.update(_pairs(value, what))
            config["Labels"] = labels
        elif keyword == "EXPOSE":
            ports = dict(config.get("ExposedPorts") or {})
            for port in value.split():
                ports[port if "/" in port else f"{port}/tcp"] = {}
            config["ExposedPorts"] = ports
        elif keyword == "VOLUME":
            volumes = dict(config.get("Volumes") or {})
            paths = _split_args(value, what) if value.strip().startswith("[") else value.split()
            for path in paths:
                volumes[path] = {}
            config["Volumes"] = volumes
        elif keyword == "USER":
            config["User"] = value.strip()
        elif keyword == "WORKDIR":
            config["WorkingDir"] = value.strip()
        elif keyword == "STOPSIGNAL":
            config["StopSignal"] = value.strip()
        elif keyword == "ONBUILD":
            config["OnBuild"] = [*(config.get("OnBuild") or []), value.strip()]
        else:
            raise UsageError(
                f"{what}: {instruction or 'empty'} is not a change that can be applied "
                "(CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, ONBUILD, STOPSIGNAL, USER, VOLUME, WORKDIR)"
            )
