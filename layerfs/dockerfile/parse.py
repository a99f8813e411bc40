"""Dockerfile syntax: text to instructions and build stages, as docker's parser reads it.

Owns the rules of buildkit's `frontend/dockerfile/parser` and the checks of
`instructions/parse.go` that need no build state:

- Parser directives (`# escape=`, `# syntax=`, `# check=`, any case) only in the leading run
  of comment lines: the first blank line, other comment or instruction ends that run. The
  escape token (`\\` or `` ` ``) then continues lines and escapes characters. `syntax` and
  `check` are accepted and ignored.
- A line whose first non-blank character is `#` is a comment, also inside a continuation;
  blank lines inside a continuation are skipped; a continuation still open at the end of
  the file ends the instruction. CRLF and a UTF-8 BOM are accepted.
- Leading `--name[=value]` flags are split off (quotes and escapes removed, `--` ends them)
  and checked against what docker accepts for the instruction; `RUN --mount`, `--network`,
  `--security`, `--device` need buildkit and are refused.
- JSON (exec) form where docker allows it; a malformed array is the shell form, as docker;
  an array of anything but strings is an error.
- Structure: only ARG before the first FROM, `FROM image [AS name]`, unique stage names.

It substitutes no variables (`expand`) and splits no arguments beyond what the checks need
(`arguments`); heredocs (`RUN <<EOF`) are refused, not parsed. Every error is a
DockerfileError whose message starts with `FILE:LINE:` (the instruction's first line).
Pure functions; the values are frozen.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass

from layerfs.dockerfile import arguments
from layerfs.dockerfile.expand import SPACE, SubstitutionError, raw_words, unquoted_words
from layerfs.errors import DockerfileError

KEYWORDS = frozenset({
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
    "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
})
_JSON_FORM = frozenset({"RUN", "CMD", "ENTRYPOINT", "SHELL", "COPY", "ADD", "VOLUME"})
_HEREDOC_FORM = frozenset({"RUN", "COPY", "ADD"})
_ONE_ARGUMENT = frozenset({"MAINTAINER", "USER", "WORKDIR", "STOPSIGNAL"})
_SOME_ARGUMENTS = frozenset({"RUN", "EXPOSE", "VOLUME", "ONBUILD"})

_STRING, _BOOL = "string", "bool"
_FLAGS: dict[str, dict[str, str]] = {
    "FROM": {"platform": _STRING},
    "COPY": {"from": _STRING, "chown": _STRING, "chmod": _STRING, "link": _BOOL},
    "ADD": {"chown": _STRING, "chmod": _STRING, "link": _BOOL, "checksum": _STRING,
            "keep-git-dir": _BOOL},
    "HEALTHCHECK": dict.fromkeys(
        ("interval", "timeout", "start-period", "start-interval", "retries"), _STRING),
}
_UNSUPPORTED_FLAGS = {"RUN": frozenset({"mount", "network", "security", "device"})}

# Go's regexp \s is ASCII [\t\n\f\r ] (no \v), unlike Python's.
_DIRECTIVE = re.compile(r"([a-zA-Z][a-zA-Z0-9]*)[\t\n\f\r ]*=[\t\n\f\r ]*(.+?)[\t\n\f\r ]*")
_DIRECTIVES = frozenset({"syntax", "escape", "check"})
# The escape token as the last non-blank character continues the line, unless it is itself
# escaped (docker's regex cannot see `\\\`, three of them: neither can this one).
_CONTINUATION = {
    escape: re.compile(rf"(?:([^{re.escape(escape)}]){re.escape(escape)}|^{re.escape(escape)})"
                       r"[ \t]*\Z")
    for escape in ("\\", "`")
}
_HEREDOC = re.compile(r"[0-9]*<<-?[\t\n\f\r ]*([^<]*)")
_STAGE_NAME = re.compile(r"[a-z][a-z0-9_.-]*")


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str  # upper case: "RUN", "COPY", ...
    # After the keyword and the flags; continuation lines joined, comment lines dropped.
    args: str
    flags: tuple[tuple[str, str], ...]  # (("from", "build"), ("link", "")) in order
    line: int  # 1-based line of the keyword
    original: str  # as `Step 3/7 : RUN echo hi` shows it: keyword as written, one line
    json_args: tuple[str, ...] | None  # exec form; for HEALTHCHECK, the CMD part's
    onbuild: Instruction | None  # ONBUILD's trigger, parsed (its line is the ONBUILD's)

    def flag(self, name: str) -> str | None:
        """The value of `--name` ("" if given without one), None if absent."""
        for key, value in self.flags:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Stage:
    index: int
    name: str | None  # `FROM image AS name`, lower-cased as docker does
    base: str  # the image text of FROM, unexpanded (may contain $ARG)
    platform: str | None  # --platform if given
    from_: Instruction
    instructions: tuple[Instruction, ...]  # after FROM, up to the next FROM


@dataclass(frozen=True, slots=True)
class Dockerfile:
    path: str  # as given, used in messages
    escape: str  # "\\" or "`"
    meta_args: tuple[Instruction, ...]  # ARGs before the first FROM
    stages: tuple[Stage, ...]
    instructions: tuple[Instruction, ...]  # all of them, in order (step counts)


def parse(text: str, path: str = "Dockerfile") -> Dockerfile:
    """The Dockerfile `text`, read from `path` (for messages). Raises DockerfileError."""
    escape, lines = _logical_lines(text, path)
    instructions = tuple(_instruction(line, number, escape, path) for number, line in lines)
    starts = [i for i, instruction in enumerate(instructions) if instruction.keyword == "FROM"]
    if not starts:
        raise DockerfileError(
            f"{path}:{instructions[0].line if instructions else 1}: no FROM instruction")
    meta_args = instructions[: starts[0]]
    for instruction in meta_args:
        if instruction.keyword != "ARG":
            raise DockerfileError(
                f"{path}:{instruction.line}: {instruction.keyword} before the first FROM: "
                "no build stage in current context (only ARG may come before FROM)")
    stages: list[Stage] = []
    for start, end in zip(starts, [*starts[1:], len(instructions)], strict=True):
        from_ = instructions[start]
        try:
            base, name = _from_parts(from_)
        except ValueError as exc:
            raise DockerfileError(f"{path}:{from_.line}: {exc}") from None
        if name is not None and any(stage.name == name for stage in stages):
            raise DockerfileError(f'{path}:{from_.line}: duplicate stage name "{name}", '
                                  "stage names should be unique")
        stages.append(Stage(index=len(stages), name=name, base=base,
                            platform=from_.flag("platform") or None, from_=from_,
                            instructions=instructions[start + 1 : end]))
    return Dockerfile(path=path, escape=escape, meta_args=meta_args, stages=tuple(stages),
                      instructions=instructions)


def _logical_lines(text: str, path: str) -> tuple[str, list[tuple[int, str]]]:
    """The escape token and each instruction's (first line number, joined text)."""
    text = text.removeprefix("\ufeff")
    raw = text.split("\n")
    if raw[-1] == "":
        raw.pop()  # the text's final newline ends a line, it does not start one
    directives = _Directives()
    out: list[tuple[int, str]] = []
    i = 0
    while i < len(raw):
        number = i + 1
        token = raw[i].rstrip("\r\n").lstrip(SPACE)
        i += 1
        try:
            directives.read(token)
        except ValueError as exc:
            raise DockerfileError(f"{path}:{number}: {exc}") from None
        if token.startswith("#"):
            continue
        content, ended = _continued(token, directives.escape)
        if ended and not content:
            continue
        parts = [content]
        while not ended and i < len(raw):
            # Continuation lines keep their leading blanks: docker joins them as they are.
            token = raw[i].rstrip("\r\n")
            i += 1
            if not token.strip(SPACE) or token.lstrip(SPACE).startswith("#"):
                continue
            content, ended = _continued(token, directives.escape)
            parts.append(content)
        out.append((number, "".join(parts)))
    return directives.escape, out


class _Directives:
    """The parser directives read so far; `read` is given each line until one is not."""

    __slots__ = ("_done", "_seen", "escape")

    def __init__(self) -> None:
        self.escape = "\\"
        self._done = False
        self._seen: set[str] = set()

    def read(self, token: str) -> None:
        if self._done:
            return
        match = _DIRECTIVE.fullmatch(token[1:].lstrip(SPACE)) if token[:1] == "#" else None
        key = match.group(1).lower() if match else ""
        if match is None or key not in _DIRECTIVES:
            self._done = True
            return
        if key in self._seen:
            raise ValueError(f"only one {key} parser directive can be used")
        self._seen.add(key)
        if key == "escape":
            value = match.group(2)
            if value not in ("\\", "`"):
                raise ValueError(f"invalid escape token '{value}' does not match ` or \\")
            self.escape = value


def _continued(line: str, escape: str) -> tuple[str, bool]:
    """`line` without its continuation token, and whether the instruction ends there."""
    match = _CONTINUATION[escape].search(line)
    if match is None:
        return line, True
    return line[: match.start()] + (match.group(1) or ""), False


def _instruction(text: str, line: int, escape: str, path: str) -> Instruction:
    try:
        return _read_instruction(text, line, escape, path)
    except ValueError as exc:
        raise DockerfileError(f"{path}:{line}: {exc}") from None


def _read_instruction(text: str, line: int, escape: str, path: str) -> Instruction:
    original = text.strip(SPACE)
    head = arguments.BLANKS.split(original, maxsplit=1)
    written, rest = head[0], head[1] if len(head) > 1 else ""
    keyword = written.upper()
    if keyword not in KEYWORDS:
        close = difflib.get_close_matches(keyword, KEYWORDS, n=1, cutoff=0.7)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"unknown instruction: {written}{hint}")
    args, flag_words = _split_flags(rest, escape)
    args = args.strip(SPACE)
    flags = _flags(keyword, flag_words)
    json_args = None
    if keyword in _JSON_FORM:
        json_args = _json_array(args)
    elif keyword == "HEALTHCHECK":
        json_args = _json_array(arguments.split_first(args)[1])
    if keyword in _HEREDOC_FORM and json_args is None and _has_heredoc(original):
        raise ValueError("heredocs are not supported")
    onbuild = _trigger(args, line, escape, path) if keyword == "ONBUILD" and args else None
    instruction = Instruction(keyword=keyword, args=args, flags=flags, line=line,
                              original=original, json_args=json_args, onbuild=onbuild)
    _check_arguments(instruction, escape)
    return instruction


def _split_flags(line: str, escape: str) -> tuple[str, list[str]]:
    """The leading `--flag` words of `line` (quotes and escapes removed) and the rest, as
    buildkit's extractBuilderFlags. A lone `--` ends the flags and is dropped."""
    words: list[str] = []
    word: list[str] = []
    quote = ""
    in_word = blank_ok = False
    i, n = 0, len(line)
    while i < n:
        ch = line[i]
        if not in_word:
            if ch in SPACE:
                i += 1
                continue
            if not line.startswith("--", i):
                return line[i:], words
            in_word = True
        i += 1
        if quote:
            if ch == quote:
                quote = ""
                continue
            if ch == escape:
                if i == n:
                    quote = ""
                    continue
                ch = line[i]
                i += 1
            word.append(ch)
            continue
        if ch in SPACE:
            if "".join(word) == "--":
                return line[i - 1 :], words
            if blank_ok or word:
                words.append("".join(word))
            word, in_word, blank_ok = [], False, False
            continue
        if ch in ("'", '"'):
            quote, blank_ok = ch, True
            continue
        if ch == escape:
            if i == n:
                continue
            ch = line[i]
            i += 1
        word.append(ch)
    if in_word and "".join(word) != "--" and (blank_ok or word):
        words.append("".join(word))
    return "", words


def _flags(keyword: str, flag_words: list[str]) -> tuple[tuple[str, str], ...]:
    allowed = _FLAGS.get(keyword, {})
    out: list[tuple[str, str]] = []
    for word in flag_words:
        name, has_value, value = word[2:].partition("=")
        flag = f"--{name}"
        if name in _UNSUPPORTED_FLAGS.get(keyword, ()):
            raise ValueError(f"{keyword} {flag} is not supported")
        kind = allowed.get(name)
        if kind is None:
            raise ValueError(f"unknown flag: {flag}")
        if any(seen == name for seen, _ in out):
            raise ValueError(f"duplicate flag specified: {flag}")
        missing = (has_value and not value) if kind == _BOOL else not has_value
        if missing:
            raise ValueError(f"missing a value on flag: {flag}")
        if kind == _BOOL and value.lower() not in ("", "true", "false"):
            raise ValueError(f"expecting boolean value for flag {flag}, not: {value}")
        out.append((name, value))
    return tuple(out)


def _json_array(args: str) -> tuple[str, ...] | None:
    """The exec form's strings, or None when `args` is not a JSON array (the shell form)."""
    rest = args.lstrip(SPACE)
    if not rest.startswith("["):
        return None
    try:
        value = json.loads(rest, parse_constant=_no_constant)
    except ValueError:
        return None  # docker: not JSON, so the shell form
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(
            "when using JSON array syntax, arrays must be comprised of strings only")
    return tuple(value)


def _no_constant(name: str) -> object:
    # Go's encoding/json has no NaN or Infinity; Python's would accept them.
    raise ValueError(f"not JSON: {name}")


def _has_heredoc(line: str) -> bool:
    """Whether docker would read a heredoc (`<<EOF`, `<<-"EOF"`, `2<<EOF`) in `line`."""
    if "<<" not in line:
        return False
    for word in raw_words(line):
        match = _HEREDOC.fullmatch(word)
        if match is None or not match.group(1):
            continue
        try:
            if len(unquoted_words(match.group(1))) == 1:
                return True
        except SubstitutionError:
            return True  # docker fails on it as well
    return False


def _trigger(args: str, line: int, escape: str, path: str) -> Instruction:
    trigger = arguments.split_blanks(args)[0].upper()
    if trigger == "ONBUILD":
        raise ValueError("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")
    if trigger in ("FROM", "MAINTAINER"):
        raise ValueError(f"{trigger} isn't allowed as an ONBUILD trigger")
    return _read_instruction(args, line, escape, path)


def _check_arguments(instruction: Instruction, escape: str) -> None:
    """docker's per-instruction argument checks (instructions/parse.go). Raises ValueError."""
    keyword, args = instruction.keyword, instruction.args
    if keyword in ("ENV", "LABEL"):
        arguments.key_values(args, keyword, escape=escape)
    elif keyword == "ARG":
        arguments.arg_definitions(args, escape=escape)
    elif keyword in ("COPY", "ADD"):
        count = len(arguments.words(instruction))
        if count < 2:
            raise ValueError(f"{keyword} requires at least two arguments" + (
                ", but only one was provided. Destination could not be determined"
                if count == 1 else ""))
    elif keyword == "HEALTHCHECK":
        arguments.healthcheck(instruction)
    elif keyword == "SHELL":
        if not args or instruction.json_args == ():
            raise ValueError("SHELL requires at least one argument")
        if instruction.json_args is None:
            raise ValueError("SHELL requires the arguments to be in JSON form")
    elif keyword in _ONE_ARGUMENT and not args:
        raise ValueError(f"{keyword} requires exactly one argument")
    elif keyword in _SOME_ARGUMENTS:
        found = (arguments.command(instruction) if keyword == "RUN"
                 else arguments.words(instruction))
        if not found:
            raise ValueError(f"{keyword} requires at least one argument")
        if keyword == "VOLUME" and any(not word.strip(SPACE) for word in found):
            raise ValueError("VOLUME specified can not be an empty string")


def _from_parts(instruction: Instruction) -> tuple[str, str | None]:
    """FROM's image and stage name (lower-cased). Raises ValueError."""
    words = arguments.split_blanks(instruction.args)
    if not words:
        raise ValueError("FROM requires an image")
    if len(words) == 3 and words[1].lower() == "as":
        name = words[2].lower()
        if not _STAGE_NAME.fullmatch(name):
            raise ValueError(f'invalid name for build stage: "{words[2]}", '
                             "name can't start with a number or contain symbols")
        return words[0], name
    if len(words) != 1:
        raise ValueError("FROM requires either one or three arguments: FROM image [AS name]")
    return words[0], None
