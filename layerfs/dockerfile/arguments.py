"""What an instruction's arguments are, before variable substitution.

Owns docker's per-instruction argument rules (buildkit's `parser/line_parsers.go` and
`instructions/parse.go`): the `K=V` and legacy `K V` forms of ENV and LABEL, ARG definitions,
the whitespace-split or JSON arguments of COPY/ADD/VOLUME/EXPOSE, the argv of
RUN/CMD/ENTRYPOINT, and HEALTHCHECK's test and durations.

Nothing here substitutes variables: words keep their quotes and escapes so that the builder
passes each through `expand.expand()` with the right environment, as docker does. Errors are
`ValueError` with docker's message; the caller adds `FILE:LINE`. Pure functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layerfs.dockerfile.expand import SPACE

if TYPE_CHECKING:
    from collections.abc import Sequence

    from layerfs.dockerfile.parse import Instruction

# buildkit's reWhitespace: ASCII blanks only (no newline), unlike the unicode SPACE the
# word splitter uses. Both are docker's, for different instructions.
BLANKS = re.compile(r"[\t\v\f\r ]+")

DEFAULT_SHELL = ("/bin/sh", "-c")


def parse_words(rest: str, *, escape: str = "\\") -> list[str]:
    """`rest` split on unquoted, unescaped whitespace, quotes and escapes kept (buildkit's
    parseWords, used for ENV, LABEL and ARG). Inside single quotes the escape is literal."""
    words: list[str] = []
    word: list[str] = []
    quote = ""
    blank_ok = False  # a word that had quotes counts even if empty: `K=""`
    in_word = False
    i, n = 0, len(rest)
    while i < n:
        ch = rest[i]
        i += 1
        if not in_word:
            if ch in SPACE:
                continue
            in_word = True
        if not quote:
            if ch in SPACE:
                if blank_ok or word:
                    words.append("".join(word))
                word, blank_ok, in_word = [], False, False
                continue
            if ch in ("'", '"'):
                quote, blank_ok = ch, True
            elif ch == escape:
                if i == n:
                    continue  # an escape token at the very end is dropped
                word.append(ch)
                ch = rest[i]
                i += 1
            word.append(ch)
            continue
        if ch == quote:
            quote = ""
        elif ch == escape and quote != "'":
            if i == n:
                continue
            word.append(ch)
            ch = rest[i]
            i += 1
        word.append(ch)
    if in_word and (blank_ok or word):
        words.append("".join(word))
    return words


def key_values(args: str, keyword: str, *, escape: str = "\\") -> list[tuple[str, str]]:
    """ENV and LABEL: `K=V K2="v 2"` pairs, or the legacy `K some value` (one pair, the value
    the rest of the line). Keys and values keep their quotes: expand each with expand().

    Pass the Dockerfile's `escape` (it decides what `\\ ` joins). Raises ValueError.
    """
    keyword = keyword.upper()
    words = parse_words(args, escape=escape)
    if not words:
        raise ValueError(f"{keyword} requires at least one argument")
    pairs: list[tuple[str, str]] = []
    if "=" not in words[0]:
        parts = BLANKS.split(args, maxsplit=1)
        if len(parts) < 2:
            raise ValueError(f"{keyword} must have two arguments")
        pairs.append((parts[0], parts[1]))
    else:
        for word in words:
            key, sep, value = word.partition("=")
            if not sep:
                raise ValueError(f"Syntax error - can't find = in {_go_quote(word)}. "
                                 "Must be of the form: name=value")
            pairs.append((key, value))
    if any(not key for key, _ in pairs):
        raise ValueError(f"{keyword} names can not be blank")
    return pairs


def arg_definitions(args: str, *, escape: str = "\\") -> list[tuple[str, str | None]]:
    """ARG NAME[=default] ...: each name and its raw (unexpanded) default, None if none.

    Pass the Dockerfile's `escape`. Raises ValueError.
    """
    words = parse_words(args, escape=escape)
    if not words:
        raise ValueError("ARG requires at least one argument")
    out: list[tuple[str, str | None]] = []
    for word in words:
        name, sep, default = word.partition("=")
        if sep and not name:
            raise ValueError("ARG names can not be blank")
        out.append((name, default if sep else None))
    return out


def split_blanks(text: str) -> list[str]:
    """buildkit's parseStringsWhitespaceDelimited: split on ASCII blanks, no quoting."""
    return [word for word in BLANKS.split(text) if word]


def words(instruction: Instruction) -> list[str]:
    """COPY, ADD, VOLUME, EXPOSE, FROM...: the JSON array in exec form, else the arguments
    split on blanks as docker's parser does. No quote handling at this stage: docker passes
    each word to the lexer, so `COPY "a b" /x` fails there (use the JSON form)."""
    if instruction.json_args is not None:
        return list(instruction.json_args)
    return split_blanks(instruction.args)


def command(instruction: Instruction, shell: Sequence[str] = DEFAULT_SHELL) -> list[str]:
    """RUN/CMD/ENTRYPOINT argv: the JSON form as is, else `[*shell, args]` with args left
    unexpanded (the shell expands it). An empty shell form gives []."""
    if instruction.json_args is not None:
        return list(instruction.json_args)
    if not instruction.args:
        return []
    return [*shell, instruction.args]


@dataclass(frozen=True, slots=True)
class Healthcheck:
    """A HEALTHCHECK as the image config holds it; durations in nanoseconds, 0 if unset."""

    test: tuple[str, ...]  # ("NONE",) | ("CMD", *argv) | ("CMD-SHELL", command)
    interval: int = 0
    timeout: int = 0
    start_period: int = 0
    start_interval: int = 0
    retries: int = 0


def split_first(text: str) -> tuple[str, str]:
    """`text` cut at its first whitespace: the first word and the rest, stripped."""
    for i, ch in enumerate(text):
        if ch in SPACE:
            return text[:i], text[i:].strip(SPACE)
    return text, ""


def healthcheck(instruction: Instruction) -> Healthcheck:
    """HEALTHCHECK NONE, or [flags] CMD command (shell or exec form). Raises ValueError."""
    kind, rest = split_first(instruction.args)
    kind = kind.upper()
    if not kind:
        raise ValueError("HEALTHCHECK requires at least one argument")
    if kind == "NONE":
        if rest:
            raise ValueError("HEALTHCHECK NONE takes no arguments")
        return Healthcheck(test=("NONE",))
    if kind != "CMD":
        raise ValueError(f'Unknown type "{kind}" in HEALTHCHECK (try CMD)')
    if instruction.json_args is not None:
        test: tuple[str, ...] = ("CMD", *instruction.json_args)
    else:
        test = ("CMD-SHELL", rest) if rest else ("CMD",)
    if len(test) == 1:
        raise ValueError("Missing command after HEALTHCHECK CMD")
    flags = dict(instruction.flags)
    return Healthcheck(
        test=test,
        interval=_interval(flags, "interval"),
        timeout=_interval(flags, "timeout"),
        start_period=_interval(flags, "start-period"),
        start_interval=_interval(flags, "start-interval"),
        retries=_retries(flags.get("retries", "")),
    )


def _retries(text: str) -> int:
    if not text:
        return 0
    # Go's strconv.ParseInt(text, 10, 32)
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ValueError(f'strconv.ParseInt: parsing "{text}": invalid syntax')
    value = int(text)
    if not -(2**31) <= value < 2**31:
        raise ValueError(f'strconv.ParseInt: parsing "{text}": value out of range')
    if value < 0:
        raise ValueError(f"--retries cannot be negative ({value})")
    return value


def _interval(flags: dict[str, str], name: str) -> int:
    text = flags.get(name, "")
    if not text:
        return 0
    value = duration(text)
    # docker: 0 means "the default", anything else must be at least a millisecond.
    if value != 0 and value < 1_000_000:
        raise ValueError(f'Interval "{name}" cannot be less than 1ms')
    return value


_UNITS = {"ns": 1, "us": 1_000, "\u00b5s": 1_000, "\u03bcs": 1_000, "ms": 1_000_000,
          "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
_DURATION_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")


def duration(text: str) -> int:
    """Go's time.ParseDuration (`1m30s`, `1.5h`, `300ms`, `-2s`) in nanoseconds.

    Raises ValueError with Go's message.
    """
    rest = text
    sign = -1 if rest.startswith("-") else 1
    rest = rest[1:] if rest[:1] in ("-", "+") else rest
    if rest == "0":
        return 0
    if not rest:
        raise ValueError(f'time: invalid duration "{text}"')
    total = 0
    while rest:
        part = _DURATION_PART.match(rest)
        assert part is not None  # every group may be empty
        whole, fraction, unit = part.group(1), part.group(2), part.group(3)
        if not whole and not fraction:
            raise ValueError(f'time: invalid duration "{text}"')
        if not unit:
            raise ValueError(f'time: missing unit in duration "{text}"')
        if unit not in _UNITS:
            raise ValueError(f'time: unknown unit "{unit}" in duration "{text}"')
        scale = _UNITS[unit]
        total += int(whole or "0") * scale
        if fraction:
            total += int(fraction) * scale // 10 ** len(fraction)
        rest = rest[part.end():]
    if total > 2**63 - 1:
        raise ValueError(f'time: invalid duration "{text}"')
    return sign * total


def _go_quote(text: str) -> str:
    """Roughly Go's %q: double quotes, backslash escapes."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
