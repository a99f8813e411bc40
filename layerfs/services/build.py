"""`build`: an image from a Dockerfile, step by step on layerfs containers, as docker's classic
builder makes it.

Every instruction is a step that turns the image of the step before into a new one:
- RUN, COPY, ADD, and WORKDIR where it has a directory to make, run in a new container of
  that image (a layerfs mount), and the container's upper becomes one more layer (`commit`).
  The container is unmounted and removed when the step ends, failed or not.
- The other instructions change only the config; the new image has the same layers and a
  history entry with `empty_layer`, as docker records them.
Each step's image is stored untagged (`images -a` shows them); only the final one is tagged.

The build cache: a step is keyed by its parent image, its instruction after substitution, the
build args a RUN sees, and for COPY and ADD the checksum of what they copy. A key seen before
whose image is still in the store is the step's result, without running it. `--no-cache`
runs every step.

Variable substitution, ARG scoping and the meaning of each instruction are docker's; the
parser (`layerfs.dockerfile`) owns the syntax. Messages name `FILE:LINE`.

Output goes to the `Report` given (the CLI prints it); a RUN writes to the given fd.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerfs.dockerfile import arguments
from layerfs.dockerfile.expand import SubstitutionError, expand
from layerfs.dockerfile.ignore import IgnoreRules, has_magic
from layerfs.dockerfile.parse import Instruction, Stage, parse
from layerfs.errors import BuildError, DockerfileError, LayerfsError
from layerfs.services import build_copy, rootpath, userns
from layerfs.services import containers as containers_service
from layerfs.services import run as run_service
from layerfs.services.commit import commit
from layerfs.services.images import SCRATCH
from layerfs.services.importing import store_image
from layerfs.store.store import now

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from layerfs.reference import Reference
    from layerfs.services.containers import Container
    from layerfs.store.store import Image, Store

    Report = Callable[[str], None]
    Resolver = Callable[[str], Image]

DEFAULT_SHELL = ("/bin/sh", "-c")
NOP = "/bin/sh -c #(nop) "


@dataclass(frozen=True, slots=True)
class BuildOptions:
    context: Path
    dockerfile_text: str
    dockerfile_name: str
    tags: tuple[Reference, ...] = ()
    build_args: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    network: bool = True
    run_output: int | None = None
    """An fd for what RUN steps print; None: this process's stdout."""


@dataclass
class _StageState:
    """A stage as it is built: its current image and what instructions see."""

    stage: Stage
    image: Image
    config: dict[str, Any]
    args: dict[str, str] = field(default_factory=dict)
    """ARGs in scope, with their values."""
    shell: list[str] = field(default_factory=lambda: list(DEFAULT_SHELL))
    cmd_set: bool = False
    """A CMD of this stage: ENTRYPOINT resets only a Cmd that came from the base image."""

    @property
    def container_config(self) -> dict[str, Any]:
        value = self.config.setdefault("config", {})
        assert isinstance(value, dict)
        return value

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.container_config.get("Env") or []:
            key, _, value = str(item).partition("=")
            out[key] = value
        return out

    def substitution(self) -> dict[str, str]:
        """What `$VAR` means in this stage: ARGs, overridden by ENV, as docker."""
        return {**self.args, **self.env()}


class Builder:
    def __init__(self, store: Store, options: BuildOptions, resolve: Resolver,
                 report: Report) -> None:
        self.store = store
        self.options = options
        self.resolve = resolve
        self.report = report
        self.dockerfile = parse(options.dockerfile_text, options.dockerfile_name)
        self.ignore = _ignore_rules(options.context)
        self.context = build_copy.SourceRoot(str(options.context), self.ignore)
        self.stages: dict[str, Image] = {}
        self._stage_images: list[Image] = []
        self._meta_args: dict[str, str] = {}
        self._used_args: set[str] = set()
        self._step = 0
        self._total = len(self.dockerfile.instructions) + (1 if options.labels else 0)

    # ------------------------------------------------------------------ the build
    def build(self) -> Image:
        self._meta(self.dockerfile.meta_args)
        stages = self._stages_to_build()
        image: Image | None = None
        for stage in stages:
            state = self._from(stage)
            for instruction in stage.instructions:
                self._instruction(state, instruction)
            if stage is stages[-1] and self.options.labels:
                labels = " ".join(f"{json.dumps(k)}={json.dumps(v)}"
                                  for k, v in sorted(self.options.labels.items()))
                self._instruction(state, _synthetic("LABEL", labels, stage.from_.line))
            image = state.image
            self._stage_images.append(image)
            if stage.name:
                self.stages[stage.name] = image
        assert image is not None
        unused = sorted(set(self.options.build_args) - self._used_args)
        if unused:
            self.report(f"[Warning] One or more build-args {unused} were not consumed")
        for ref in self.options.tags:
            self.store.tag(image, ref)
        return self.store.image(image.id)

    def _stages_to_build(self) -> list[Stage]:
        stages = list(self.dockerfile.stages)
        target = self.options.target
        if target is None:
            return stages
        for i, stage in enumerate(stages):
            if stage.name == target.lower():
                return stages[: i + 1]
        raise BuildError(f"{target}: no such stage in {self.dockerfile.path}")

    def _where(self, instruction: Instruction) -> str:
        return f"{self.dockerfile.path}:{instruction.line}"

    def _expand(self, instruction: Instruction, text: str, env: dict[str, str]) -> str:
        try:
            return expand(text, env, escape=self.dockerfile.escape)
        except SubstitutionError as exc:
            raise DockerfileError(f"{self._where(instruction)}: {exc}") from None

    def _expand_words(self, instruction: Instruction, words: list[str],
                      env: dict[str, str]) -> list[str]:
        return [self._expand(instruction, word, env) for word in words]

    def _begin(self, instruction: Instruction, shown: str | None = None) -> None:
        self._step += 1
        self.report(f"Step {self._step}/{self._total} : {shown or instruction.original}")

    # ------------------------------------------------------------------ ARG and FROM
    def _meta(self, instructions: tuple[Instruction, ...]) -> None:
        for instruction in instructions:
            self._begin(instruction)
            for name, default in self._arg_definitions(instruction):
                value = self.options.build_args.get(name)
                if value is not None:
                    self._used_args.add(name)
                elif default is not None:
                    value = self._expand(instruction, default, self._meta_args)
                if value is not None:
                    self._meta_args[name] = value

    def _arg_definitions(self, instruction: Instruction) -> list[tuple[str, str | None]]:
        try:
            return arguments.arg_definitions(instruction.args, escape=self.dockerfile.escape)
        except ValueError as exc:
            raise DockerfileError(f"{self._where(instruction)}: {exc}") from None

    def _from(self, stage: Stage) -> _StageState:
        self._begin(stage.from_)
        name = self._expand(stage.from_, stage.base, self._meta_args)
        if not name:
            raise DockerfileError(f"{self._where(stage.from_)}: FROM names no image "
                                  f"({stage.base} is empty)")
        base = self.stages.get(name.lower())
        if base is None:
            index = _stage_index(name, len(self._stage_images))
            base = self._stage_images[index] if index is not None else self._base_image(
                stage.from_, name)
        self.report(f" ---> {base.short_id}")
        state = _StageState(stage, base, copy.deepcopy(base.config.doc))
        env = state.container_config.get("Env") or []
        if not any(str(e).startswith("PATH=") for e in env):
            # docker and buildah give an image without a PATH (scratch) the default one
            state.container_config["Env"] = [f"PATH={run_service.DEFAULT_PATH}", *env]
        triggers = [str(t) for t in state.container_config.get("OnBuild") or []]
        if triggers:
            state.container_config["OnBuild"] = None
            self.report(f"# Executing {len(triggers)} build trigger"
                        f"{'s' if len(triggers) > 1 else ''}")
            for trigger in triggers:
                self._trigger(state, trigger, stage.from_.line)
        return state

    def _base_image(self, instruction: Instruction, name: str) -> Image:
        try:
            return self.resolve(name)
        except LayerfsError as exc:
            raise BuildError(f"{self._where(instruction)}: {exc}") from None

    def _trigger(self, state: _StageState, text: str, line: int) -> None:
        try:
            parsed = parse(f"FROM {SCRATCH}\n{text}\n", self.dockerfile.path)
        except DockerfileError as exc:
            raise DockerfileError(f"{self.dockerfile.path}:{line}: ONBUILD trigger "
                                  f"{text!r}: {exc}") from None
        for instruction in parsed.stages[0].instructions:
            self._dispatch(state, replace(instruction, line=line))

    # ------------------------------------------------------------------ instructions
    def _instruction(self, state: _StageState, instruction: Instruction) -> None:
        self._begin(instruction)
        self._dispatch(state, instruction)

    def _dispatch(self, state: _StageState, instruction: Instruction) -> None:
        keyword = instruction.keyword
        handler = getattr(self, f"_do_{keyword.lower()}", None)
        if handler is None:
            raise DockerfileError(f"{self._where(instruction)}: {keyword} cannot be built")
        handler(state, instruction)

    def _do_arg(self, state: _StageState, instruction: Instruction) -> None:
        env = state.substitution()
        for name, default in self._arg_definitions(instruction):
            value = self.options.build_args.get(name)
            if value is not None:
                self._used_args.add(name)
            elif default is not None:
                value = self._expand(instruction, default, env)
            elif name in self._meta_args:
                value = self._meta_args[name]
            if value is not None:
                state.args[name] = value
            else:  # declared without a value: unset, as `${NAME-x}` tells apart from ""
                state.args.pop(name, None)
        self._metadata(state, instruction, f"ARG {instruction.args}", lambda: None)

    def _do_env(self, state: _StageState, instruction: Instruction) -> None:
        pairs = self._pairs(state, instruction)

        def change() -> None:
            env = [str(e) for e in state.container_config.get("Env") or []]
            for key, value in pairs:
                env = [e for e in env if e.partition("=")[0] != key] + [f"{key}={value}"]
            state.container_config["Env"] = env

        shown = " ".join(f"{k}={v}" for k, v in pairs)
        self._metadata(state, instruction, f"ENV {shown}", change)

    def _do_label(self, state: _StageState, instruction: Instruction) -> None:
        pairs = self._pairs(state, instruction)

        def change() -> None:
            labels = dict(state.container_config.get("Labels") or {})
            labels.update(pairs)
            state.container_config["Labels"] = labels

        shown = " ".join(f"{k}={v}" for k, v in pairs)
        self._metadata(state, instruction, f"LABEL {shown}", change)

    def _pairs(self, state: _StageState, instruction: Instruction) -> list[tuple[str, str]]:
        try:
            raw = arguments.key_values(instruction.args, instruction.keyword,
                                         escape=self.dockerfile.escape)
        except ValueError as exc:
            raise DockerfileError(f"{self._where(instruction)}: {exc}") from None
        env = state.substitution()  # one instruction sees the values from before it
        return [(self._expand(instruction, k, env), self._expand(instruction, v, env))
                for k, v in raw]

    def _do_maintainer(self, state: _StageState, instruction: Instruction) -> None:
        value = instruction.args

        def change() -> None:
            state.config["author"] = value

        self._metadata(state, instruction, f"MAINTAINER {value}", change)

    def _do_expose(self, state: _StageState, instruction: Instruction) -> None:
        ports = self._expand_words(instruction, arguments.words(instruction),
                                   state.substitution())
        for port in ports:
            number, _, proto = port.partition("/")
            if not number or not all(p.isdigit() for p in number.split("-")) or \
                    proto not in ("", "tcp", "udp", "sctp"):
                raise DockerfileError(f"{self._where(instruction)}: invalid port {port!r}")

        def change() -> None:
            exposed = dict(state.container_config.get("ExposedPorts") or {})
            for port in ports:
                exposed[port if "/" in port else f"{port}/tcp"] = {}
            state.container_config["ExposedPorts"] = exposed

        self._metadata(state, instruction, f"EXPOSE {' '.join(ports)}", change)

    def _do_volume(self, state: _StageState, instruction: Instruction) -> None:
        paths = self._expand_words(instruction, arguments.words(instruction),
                                   state.substitution())
        if not paths or any(not p for p in paths):
            raise DockerfileError(f"{self._where(instruction)}: VOLUME specified can not be "
                                  "an empty string")

        def change() -> None:
            volumes = dict(state.container_config.get("Volumes") or {})
            for path in paths:
                volumes[path] = {}
            state.container_config["Volumes"] = volumes

        # only the config, as buildkit: docker's classic builder and buildah make the
        # mountpoints only in the containers of later RUN steps, so they show or not
        # depending on what follows
        self._metadata(state, instruction, f"VOLUME {json.dumps(paths)}", change)

    def _do_user(self, state: _StageState, instruction: Instruction) -> None:
        user = self._expand(instruction, instruction.args, state.substitution())

        def change() -> None:
            state.container_config["User"] = user

        self._metadata(state, instruction, f"USER {user}", change)

    def _do_stopsignal(self, state: _StageState, instruction: Instruction) -> None:
        signal = self._expand(instruction, instruction.args, state.substitution())

        def change() -> None:
            state.container_config["StopSignal"] = signal

        self._metadata(state, instruction, f"STOPSIGNAL {signal}", change)

    def _do_onbuild(self, state: _StageState, instruction: Instruction) -> None:
        inner = instruction.args

        def change() -> None:
            state.container_config["OnBuild"] = [
                *(state.container_config.get("OnBuild") or []), inner]

        self._metadata(state, instruction, f"ONBUILD {inner}", change)

    def _do_shell(self, state: _StageState, instruction: Instruction) -> None:
        if instruction.json_args is None or not instruction.json_args:
            raise DockerfileError(f"{self._where(instruction)}: SHELL requires the arguments "
                                  "to be in JSON form")
        shell = list(instruction.json_args)

        def change() -> None:
            state.shell = shell
            state.container_config["Shell"] = shell

        self._metadata(state, instruction, f"SHELL {json.dumps(shell)}", change)

    def _do_cmd(self, state: _StageState, instruction: Instruction) -> None:
        argv = arguments.command(instruction, state.shell)

        def change() -> None:
            state.container_config["Cmd"] = argv

        state.cmd_set = True

        self._metadata(state, instruction, f"CMD {json.dumps(argv)}", change)

    def _do_entrypoint(self, state: _StageState, instruction: Instruction) -> None:
        argv = arguments.command(instruction, state.shell) if instruction.args else []

        def change() -> None:
            state.container_config["Entrypoint"] = argv or None
            if not state.cmd_set:
                state.container_config.pop("Cmd", None)
        self._metadata(state, instruction, f"ENTRYPOINT {json.dumps(argv)}", change)

    def _do_healthcheck(self, state: _StageState, instruction: Instruction) -> None:
        check = _healthcheck(instruction, self._where(instruction))

        def change() -> None:
            state.container_config["Healthcheck"] = check

        self._metadata(state, instruction, f"HEALTHCHECK {json.dumps(check)}", change)

    def _do_workdir(self, state: _StageState, instruction: Instruction) -> None:
        path = self._expand(instruction, instruction.args, state.substitution())
        current = state.container_config.get("WorkingDir") or "/"
        workdir = os.path.normpath(path if path.startswith("/") else f"{current}/{path}")
        workdir = "/" + workdir.lstrip("/")

        def change() -> None:
            state.container_config["WorkingDir"] = workdir

        # made for the USER in force, as buildkit and buildah make it
        user = state.container_config.get("User") or ""
        self._dirs_step(state, instruction, f"WORKDIR {workdir}", change, [workdir], user)

    def _dirs_step(self, state: _StageState, instruction: Instruction, shown: str,
                   change: Callable[[], None], paths: list[str], user: str) -> None:
        """A config change that also makes directories where the image lacks them (WORKDIR,
        VOLUME): a layer if it made one, else a step like any other config change."""
        if self._cached(state, instruction, shown, ""):
            return
        key = self._key(state, shown, "")
        change()

        def make(root: Path) -> None:
            uid, gid = 0, 0
            if user:
                try:
                    uid, gid, _groups, _home = run_service.user_of(root, user)
                except LayerfsError as exc:
                    raise BuildError(f"{self._where(instruction)}: {exc}") from None
            for path in paths:
                rootpath.make_dirs(str(root), path, 0o755, uid, gid)

        image = self._in_container(state, instruction, make, f"{NOP} {shown}",
                                   keep_empty=False)
        self._done(state, key, image)

    # ------------------------------------------------------------------ steps with a layer
    def _do_run(self, state: _StageState, instruction: Instruction) -> None:
        argv = arguments.command(instruction, state.shell)
        args = dict(state.args)  # RUN sees the ARGs in scope, and its cache key has them
        args_text = " ".join(f"{k}={v}" for k, v in sorted(args.items()))
        created_by = (f"|{len(args)} {args_text} " if args else "") + " ".join(argv)
        if self._cached(state, instruction, created_by, ""):
            return
        key = self._key(state, created_by, "")
        config = state.container_config

        def run(root: Path) -> None:
            env = [*(f"{k}={v}" for k, v in args.items()), *(config.get("Env") or [])]
            process = run_service.process_for(
                root, {"Env": env}, argv, [], config.get("WorkingDir") or None,
                config.get("User") or None, state.stage.base)
            status = run_service.run_in(root, process, network=self.options.network,
                                        host_files=True, stdout=self.options.run_output)
            if status != 0:
                raise BuildError(f"{self._where(instruction)}: The command "
                                 f"'{' '.join(argv)}' returned a non-zero code: {status}")

        image = self._in_container(state, instruction, run, " ".join(argv))
        self._done(state, key, image)

    def _do_copy(self, state: _StageState, instruction: Instruction) -> None:
        self._copy(state, instruction, add=False)

    def _do_add(self, state: _StageState, instruction: Instruction) -> None:
        self._copy(state, instruction, add=True)

    def _copy(self, state: _StageState, instruction: Instruction, *, add: bool) -> None:
        flags = dict(instruction.flags)
        env = state.substitution()
        words = self._expand_words(instruction, arguments.words(instruction), env)
        if len(words) < 2:
            raise DockerfileError(f"{self._where(instruction)}: {instruction.keyword} requires "
                                  "at least two arguments")
        *patterns, dest = words
        dest = build_copy.destination(dest, state.container_config.get("WorkingDir") or "/")
        chown = self._expand(instruction, flags["chown"], env) if "chown" in flags else None
        chmod = _mode(flags.get("chmod"), self._where(instruction))
        what = f"{self._where(instruction)}: {instruction.keyword}"
        urls = [p for p in patterns if add and _is_url(p)]
        with contextlib.ExitStack() as scope:
            source_root, from_id = self._copy_source(scope, state, instruction, flags)
            local = [p for p in patterns if p not in urls]
            sources = build_copy.find_sources(source_root, local, what) if local else []
            checksum = build_copy.checksum(source_root, sources) if sources else ""
            inputs = json.dumps([checksum, urls, chown, flags.get("chmod"), from_id])
            shown = f"{instruction.keyword} {' '.join(patterns)} {dest}"
            created_by = f"{NOP}{instruction.keyword} {checksum or ' '.join(urls)} in {dest} "
            if self._cached(state, instruction, shown, inputs):
                return
            key = self._key(state, shown, inputs)
            many = len(patterns) > 1 or any(has_magic(p) for p in patterns)

            def copy_in(root: Path) -> None:
                owner = _owner(root, chown, self._where(instruction))
                plain = sources
                if add:
                    plain = []
                    for source in sources:
                        real = rootpath.resolve(source_root.path,
                                                rootpath.inside(source_root.path, source))
                        if build_copy.is_archive(real):
                            build_copy.unpack(real, str(root), dest)
                        else:
                            plain.append(source)
                    for url in urls:
                        self._download(url, root, dest, owner, chmod, many)
                if plain:
                    build_copy.copy(source_root, plain, str(root), dest, owner, chmod,
                                    many=many)

            image = self._in_container(state, instruction, copy_in, created_by)
        self._done(state, key, image)

    def _copy_source(self, scope: contextlib.ExitStack, state: _StageState,
                     instruction: Instruction, flags: dict[str, str],
                     ) -> tuple[build_copy.SourceRoot, str]:
        """Where COPY reads: the context, or with `--from` a stage's or image's root, mounted
        for the step."""
        source = flags.get("from")
        if source is None:
            return self.context, ""
        name = self._expand(instruction, source, self._meta_args)
        image = self.stages.get(name.lower())
        if image is None:
            index = _stage_index(name, len(self._stage_images))
            image = (self._stage_images[index] if index is not None
                     else self._base_image(instruction, name))
        root = scope.enter_context(self._mounted(image, "from"))
        return build_copy.SourceRoot(str(root)), image.id

    def _download(self, url: str, root: Path, dest: str, owner: build_copy.Owner,
                  mode: int | None, many: bool) -> None:
        from layerfs.registry.download import open_url  # httpx: only for a URL

        name = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0] or "index.html"
        into_dir = dest.endswith("/") or many
        target = f"{dest.rstrip('/')}/{name}" if into_dir else dest
        parent = rootpath.make_dirs(str(root), os.path.dirname(target) or "/", 0o755,
                                    owner.uid, owner.gid)
        path = os.path.join(parent, os.path.basename(target))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        with open_url(url) as body, open(path, "xb") as out:
            while block := body.read(1 << 20):
                out.write(block)
        os.lchown(path, owner.uid, owner.gid)
        os.chmod(path, mode if mode is not None else 0o600)

    # ------------------------------------------------------------------ the machinery
    def _key(self, state: _StageState, shown: str, inputs: str) -> str:
        doc = [state.image.id, shown, inputs]
        return "sha256:" + hashlib.sha256(json.dumps(doc).encode()).hexdigest()

    def _cached(self, state: _StageState, instruction: Instruction, shown: str,
                inputs: str) -> bool:
        """Take the step's image from the cache if it is there."""
        if self.options.no_cache:
            return False
        key = self._key(state, shown, inputs)
        image_id = self.store.state().build_cache.get(key)
        if image_id is None:
            return False
        try:
            image = self.store.image(image_id)
        except LayerfsError:
            return False
        self.report(" ---> Using cache")
        self._adopt(state, image, instruction)
        self.report(f" ---> {image.short_id}")
        return True

    def _adopt(self, state: _StageState, image: Image, instruction: Instruction) -> None:
        """`image` is the stage's new current image; the builder's own state follows it (the
        SHELL in force is part of the config)."""
        state.image = image
        state.config = copy.deepcopy(image.config.doc)
        if instruction.keyword == "SHELL":
            state.shell = list(state.container_config.get("Shell") or DEFAULT_SHELL)

    def _done(self, state: _StageState, key: str, image: Image) -> None:
        with self.store.transaction() as index:
            index.build_cache[key] = image.id
        state.image = image
        state.config = copy.deepcopy(image.config.doc)
        self.report(f" ---> {image.short_id}")

    def _metadata(self, state: _StageState, instruction: Instruction, shown: str,
                  change: Callable[[], None]) -> None:
        """A step that changes only the config: the same layers, one more history entry."""
        if self._cached(state, instruction, shown, ""):
            return  # the cached config has the change; `_adopt` took the SHELL
        key = self._key(state, shown, "")
        change()
        config = state.config
        created = now()
        config["created"] = created
        config["history"] = [*config.get("history", []),
                             {"created": created, "created_by": f"{NOP} {shown}",
                              "empty_layer": True}]
        image = store_image(self.store, config, list(state.image.manifest.layers), [])
        self._done(state, key, image)

    @contextlib.contextmanager
    def _mounted(self, image: Image, purpose: str) -> Iterator[Path]:
        """A new container of `image`, mounted on a temp dir; unmounted and removed after."""
        with contextlib.ExitStack() as scope:
            container = self._container(scope, image, purpose)
            mnt = Path(scope.enter_context(tempfile.TemporaryDirectory(prefix="layerfs-build-")))
            containers_service.mount(self.store, container, image, str(mnt))
            scope.callback(self._unmount, container)
            yield mnt

    def _container(self, scope: contextlib.ExitStack, image: Image, purpose: str) -> Container:
        container = containers_service.create(self.store, image, f"build:{purpose}")
        scope.callback(self._remove, container)
        return container

    def _unmount(self, container: Container) -> None:
        if containers_service.is_mounted(container):
            containers_service.umount(self.store, container)

    def _remove(self, container: Container) -> None:
        containers_service.remove(self.store, container, force=True)

    def _in_container(self, state: _StageState, instruction: Instruction,
                      work: Callable[[Path], None], created_by: str, *,
                      keep_empty: bool = True) -> Image:
        """Run `work` on a container of the stage's image and commit what it changed into
        the step's image, with the config as the stage has it now. Rootless, the container
        is mounted and worked on in a user namespace with the user's ids (as `run` does), so
        that the image's root may write and chown, and a RUN as another USER gets in."""
        base = self._with_config(state)
        with contextlib.ExitStack() as scope:
            container = self._container(scope, base, instruction.keyword.lower())

            def mounted() -> None:
                with tempfile.TemporaryDirectory(prefix="layerfs-build-") as mnt_dir:
                    mnt = Path(mnt_dir)
                    containers_service.mount(self.store, container, base, str(mnt))
                    try:
                        work(mnt)
                    except OSError as exc:
                        raise BuildError(f"{self._where(instruction)}: {instruction.keyword} "
                                         f"failed: {_os_text(exc, mnt)}") from None
                    finally:
                        self._unmount(container)

            self.report(f" ---> Running in {container.short_id}")
            if os.geteuid() == 0:
                mounted()
            else:
                userns.with_own_mounts(mounted)
            if not keep_empty and not containers_service.changes(self.store, container):
                self.report(f"Removing intermediate container {container.short_id}")
                return self._empty_step(state, base, created_by)
            image = commit(self.store, container, [], created_by=created_by)
            self.report(f"Removing intermediate container {container.short_id}")
            return image

    def _with_config(self, state: _StageState) -> Image:
        """The stage's image with the config as the builder has it now (a WORKDIR being
        made); the image itself when nothing differs."""
        if state.config == state.image.config.doc:
            return state.image
        return store_image(self.store, state.config, list(state.image.manifest.layers), [])

    def _empty_step(self, state: _StageState, base: Image, created_by: str) -> Image:
        config = copy.deepcopy(base.config.doc)
        created = now()
        config["created"] = created
        config["history"] = [*config.get("history", []),
                             {"created": created, "created_by": created_by,
                              "empty_layer": True}]
        return store_image(self.store, config, list(base.manifest.layers), [])


def build(store: Store, options: BuildOptions, resolve: Resolver, report: Report) -> Image:
    """Build; the final image (tagged with `options.tags`). BuildError, DockerfileError."""
    return Builder(store, options, resolve, report).build()


def _ignore_rules(context: Path) -> IgnoreRules | None:
    try:
        text = (context / ".dockerignore").read_text()
    except FileNotFoundError:
        return None
    return IgnoreRules.parse(text)


def _stage_index(name: str, built: int) -> int | None:
    """`FROM 0` / `COPY --from=1`: a stage by its number, if it is one built already."""
    if name.isdigit() and int(name) < built:
        return int(name)
    return None


def _synthetic(keyword: str, args: str, line: int) -> Instruction:
    """An instruction the build adds (`--label`), as if written at `line`."""
    return replace(parse(f"FROM {SCRATCH}\n{keyword} {args}\n").stages[0].instructions[0],
                   line=line)


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def _mode(text: str | None, where: str) -> int | None:
    if text is None:
        return None
    try:
        mode = int(text, 8)
    except ValueError:
        raise DockerfileError(f"{where}: invalid --chmod {text!r}: an octal mode") from None
    if not 0 <= mode <= 0o7777:
        raise DockerfileError(f"{where}: invalid --chmod {text!r}: an octal mode")
    return mode


def _owner(root: Path, chown: str | None, where: str) -> build_copy.Owner:
    """`--chown=user[:group]` against the container's /etc/passwd and /etc/group."""
    if not chown:
        return build_copy.ROOT_OWNER
    user, _, group = chown.partition(":")
    try:
        uid, gid, _groups, _home = run_service.user_of(root, f"{user}:{group or user}"
                                                       if group or not user.isdigit()
                                                       else user)
    except LayerfsError as exc:
        raise BuildError(f"{where}: --chown: {exc}") from None
    if not group and user.isdigit():
        gid = uid  # docker: a numeric user alone gives the same number as group
    return build_copy.Owner(uid, gid)


def _os_text(exc: OSError, root: Path) -> str:
    where = exc.filename
    if where is not None:
        where = os.fsdecode(where)
        with contextlib.suppress(ValueError):
            where = "/" + rootpath.inside(str(root), where)
        return f"{where}: {exc.strerror}"
    return str(exc.strerror or exc)


def _healthcheck(instruction: Instruction, where: str) -> dict[str, Any]:
    """The config's Healthcheck: docker leaves out the durations that are not set."""
    try:
        check = arguments.healthcheck(instruction)
    except ValueError as exc:
        raise DockerfileError(f"{where}: {exc}") from None
    out: dict[str, Any] = {"Test": list(check.test)}
    for key, value in (("Interval", check.interval), ("Timeout", check.timeout),
                       ("StartPeriod", check.start_period),
                       ("StartInterval", check.start_interval), ("Retries", check.retries)):
        if value:
            out[key] = value
    return out
