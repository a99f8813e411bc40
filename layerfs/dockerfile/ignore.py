"""`.dockerignore` rules and Go's `filepath.Match`, as moby/patternmatcher reads them.

Owns the file format (ignorefile.ReadAll: one pattern a line, `#` comments only in the first
column, blanks trimmed, `!` exceptions, patterns cleaned like filepath.Clean and a leading `/`
dropped) and the matching (patternmatcher.MatchesOrParentMatches): a path is excluded when
the last pattern that matches it or one of its parent directories is not an exception.

Pattern syntax is filepath.Match's: `*` any run of characters but `/`, `?` one character but
`/`, `[a-z]` and `[^a-z]` classes, `\\` escapes the next character. In ignore patterns `**`
also matches any number of directories, with patternmatcher's corner cases (`**` at the
start matches any suffix: `**.txt` is `*.txt` in any directory; `dir/**` matches everything
under dir, not dir itself).

It does not walk a tree: `excluded` answers for one path, and `has_exceptions` tells a walker
whether it may skip an excluded directory whole (docker skips it unless an exception could
re-include something below). Paths are relative to the context root, `/`-separated. Values
are frozen; compiled patterns are cached; safe from any thread.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from layerfs.dockerfile.expand import SPACE
from layerfs.errors import DockerfileError

# How a cleaned ignore pattern matches, as patternmatcher decides it (matchType).
_EXACT, _PREFIX, _SUFFIX, _REGEX = "exact", "prefix", "suffix", "regex"


class _BadPattern(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Rule:
    """One `.dockerignore` line: its cleaned pattern and whether it is a `!` exception."""

    pattern: str
    exception: bool
    _kind: str
    _regex: re.Pattern[str] | None

    @classmethod
    def compile(cls, pattern: str, exception: bool) -> Rule:
        """Raises ValueError for a pattern filepath.Match would refuse."""
        kind, source = _translate(pattern, globstar=True)
        return cls(pattern, exception, kind, re.compile(source) if kind == _REGEX else None)

    def matches(self, path: str) -> bool:
        if self._kind == _EXACT:
            return path == self.pattern
        if self._kind == _PREFIX:
            return path.startswith(self.pattern[:-2])  # the pattern without its "**"
        if self._kind == _SUFFIX:
            suffix = self.pattern[2:]  # the pattern without its leading "**"
            # `**/foo` also matches a top-level "foo"
            return path.endswith(suffix) or (suffix[:1] == "/" and path == suffix[1:])
        assert self._regex is not None
        return self._regex.fullmatch(path) is not None


@dataclass(frozen=True, slots=True)
class IgnoreRules:
    rules: tuple[Rule, ...]

    @classmethod
    def parse(cls, text: str, path: str = ".dockerignore") -> IgnoreRules:
        """The rules of a `.dockerignore` file's `text`.

        Raises DockerfileError (`PATH:LINE: ...`) for a malformed pattern (`[`, a lone `!`),
        as docker refuses the build.
        """
        rules: list[Rule] = []
        for number, line in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
            pattern = line.removesuffix("\r")
            if pattern.startswith("#"):
                continue
            pattern = pattern.strip(SPACE)
            if not pattern:
                continue
            exception = pattern.startswith("!")
            if exception:
                pattern = pattern[1:].strip(SPACE)
            if pattern:
                pattern = clean(pattern)
                if len(pattern) > 1 and pattern.startswith("/"):
                    pattern = pattern[1:]
            if exception:
                # patternmatcher cleans the whole "!..." again: "!/" becomes "!"
                pattern = clean("!" + pattern)[1:]
            if exception and not pattern:
                raise DockerfileError(f'{path}:{number}: illegal exclusion pattern: "!"')
            try:
                rules.append(Rule.compile(pattern, exception))
            except ValueError as exc:
                raise DockerfileError(f"{path}:{number}: {exc}") from None
        return cls(tuple(rules))

    def excluded(self, path: str) -> bool:
        """Whether `path` (relative to the context, `/`-separated) is left out of the
        context. The root itself never is."""
        path = clean(path).lstrip("/")
        if path in ("", "."):
            return False
        parents = path.split("/")[:-1]
        excluded = False
        for rule in self.rules:
            # An exclusion can only change an included path, an exception an excluded one.
            if rule.exception != excluded:
                continue
            if rule.matches(path) or any(
                    rule.matches("/".join(parents[:depth]))
                    for depth in range(1, len(parents) + 1)):
                excluded = not rule.exception
        return excluded

    @property
    def has_exceptions(self) -> bool:
        """Whether any rule is a `!` exception: only then may something inside an excluded
        directory be included again, so that a walker must look inside it."""
        return any(rule.exception for rule in self.rules)


def match(pattern: str, name: str) -> bool:
    """Go's filepath.Match: whether all of `name` matches `pattern` (`*` does not cross `/`,
    `**` is just two stars). Raises ValueError for a malformed pattern."""
    return _match_regex(pattern).fullmatch(name) is not None


def has_magic(pattern: str) -> bool:
    """Whether `pattern` has an unescaped `*`, `?` or `[` (moby's containsWildcards): if
    not, it names one path, with its backslashes as written."""
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\":
            i += 2
            continue
        if pattern[i] in "*?[":
            return True
        i += 1
    return False


def clean(path: str) -> str:
    """Go's path.Clean: no empty or `.` elements, `..` resolved lexically, "." if empty."""
    rooted = path.startswith("/")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(part)
    joined = "/".join(parts)
    if rooted:
        return "/" + joined
    return joined or "."


@functools.lru_cache(maxsize=512)
def _match_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(_translate(pattern, globstar=False)[1])


def _translate(pattern: str, *, globstar: bool) -> tuple[str, str]:
    """(match kind, regex source) of a pattern; the kind is patternmatcher's, used only
    with `globstar`. Raises ValueError for a malformed pattern."""
    kind = _EXACT
    out: list[str] = []
    i, n = 0, len(pattern)
    try:
        while i < n:
            first = i == 0
            ch = pattern[i]
            i += 1
            if ch == "*" and globstar and pattern.startswith("*", i):
                i += 1
                if pattern.startswith("/", i):
                    i += 1  # `**/` is `**`
                if i == n:
                    if kind == _EXACT:
                        kind = _PREFIX
                    else:
                        out.append(".*")
                        kind = _REGEX
                else:
                    out.append("(?:.*/)?")  # any number of directories, even none
                    kind = _REGEX
                if first:
                    kind = _SUFFIX
            elif ch in "*?":
                out.append("[^/]*" if ch == "*" else "[^/]")
                kind = _REGEX
            elif ch == "\\":
                if i == n:
                    raise _BadPattern
                out.append(re.escape(pattern[i]))
                i += 1
                kind = _REGEX
            elif ch == "[":
                source, i = _char_class(pattern, i)
                out.append(source)
                kind = _REGEX
            else:
                out.append(re.escape(ch))
                if ch == "]":
                    kind = _REGEX  # as patternmatcher, for the same prefix/suffix choice
    except _BadPattern:
        raise ValueError(f"{pattern}: syntax error in pattern") from None
    return kind, "".join(out)


def _char_class(pattern: str, i: int) -> tuple[str, int]:
    """The regex of the class whose `[` is just before `i`, and the index after its `]`.

    filepath.Match's rules: `^` negates; a range is `lo-hi`; `\\` escapes; `]` and `-` must
    be escaped inside; an empty or unterminated class is malformed.
    """
    negated = pattern.startswith("^", i)
    if negated:
        i += 1
    ranges: list[str] = []
    while True:
        if pattern.startswith("]", i) and ranges:
            return "[" + "^" * negated + "".join(ranges) + "]", i + 1
        lo, i = _class_char(pattern, i)
        hi = lo
        if pattern[i] == "-":
            hi, i = _class_char(pattern, i + 1)
        if lo > hi:
            raise _BadPattern  # filepath.Match would never match; Go's regexp refuses it
        ranges.append(re.escape(lo) if lo == hi else f"{re.escape(lo)}-{re.escape(hi)}")


def _class_char(pattern: str, i: int) -> tuple[str, int]:
    """One (possibly escaped) character of a class at `i`, and the index after it; the
    class must go on after it."""
    if i >= len(pattern) or pattern[i] in "-]":
        raise _BadPattern
    if pattern[i] == "\\":
        i += 1
        if i >= len(pattern):
            raise _BadPattern
    if i + 1 >= len(pattern):
        raise _BadPattern
    return pattern[i], i + 1
