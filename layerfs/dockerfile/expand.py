"""Docker's shell lexer: variable substitution and word splitting in Dockerfile arguments.

This owns what `$VAR` and quotes mean in an instruction's arguments, as buildkit's
`frontend/dockerfile/shell/lex.go` (used by `docker build` and by the classic builder):

- `$NAME`, `${NAME}`; an unset variable expands to the empty string. A name is letters,
  digits and `_`; `$1`, `$001` read all their digits and `$@ $* $# $? $- $$ $! $0` read one
  character, and none of them is ever set. `$` before anything else stays a literal `$`.
- `${NAME:-word} ${NAME-word} ${NAME:+word} ${NAME+word} ${NAME:?msg} ${NAME?msg}`, the word
  itself substituted; the colon forms treat an empty value as unset.
- `${NAME#pattern} ${NAME##pattern} ${NAME%pattern} ${NAME%%pattern}` (shortest / longest
  prefix or suffix removed) and `${NAME/pattern/repl} ${NAME//pattern/repl}`, with `*` and `?`
  wildcards and `\\` escaping them (always a backslash, whatever the escape token).
- Anything else inside `${...}` is an error (`${}`, `${:-x}`, `${NAME:=x}`, `${#NAME}`).
- Single quotes are literal; inside double quotes the escape token escapes only `"`, `$` and
  itself; outside quotes it escapes any character, and a trailing one is dropped. Quotes are
  removed. With `# escape=\\`` a backslash is an ordinary character (Windows paths).

It does not know which instructions are expanded or with which variables (the builder's
business), and it never runs a command: `$(...)` and backquotes are left as written. Pure
functions, no state between calls; safe from any thread.

One deliberate difference from buildkit: its ProcessWords shares one word buffer between
nesting levels, so `a${X:-b}` splits as `["b"]`; here each level has its own (`["ab"]`).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

# Go's unicode.IsSpace, which is what buildkit means by whitespace. Python's str.isspace()
# also counts the ASCII separators \x1c-\x1f; Go does not.
SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)

_SPECIAL_PARAMS = "@*#?-$!0"  # POSIX special parameters: one character names, never set
_HEREDOC_SPACE = "\t\r "  # what may separate `<<` from its word


class SubstitutionError(ValueError):
    """A word that does not lex (an open quote, a bad `${...}`, `${X:?}` with X unset).

    The message is buildkit's (`failed to process "...": ...`); the builder adds FILE:LINE.
    """


def expand(word: str, env: Mapping[str, str], *, escape: str = "\\") -> str:
    """`word` with variables substituted and quotes removed (buildkit's ProcessWord).

    Whitespace between words is kept. Raises SubstitutionError.
    """
    return _Lexer(word, env, escape).process()[0]


def expand_words(text: str, env: Mapping[str, str], *, escape: str = "\\") -> list[str]:
    """`text` substituted, then split on whitespace that is neither quoted nor escaped
    (buildkit's ProcessWords). A substituted value is split too, as in a shell, unless it
    is inside double quotes; an empty quoted word (`""`) is dropped, as docker does.

    Raises SubstitutionError.
    """
    return _Lexer(text, env, escape).process()[1]


def raw_words(text: str) -> list[str]:
    """The words of `text` as buildkit's heredoc detection sees them: quotes, escapes and
    unset variables kept as written, `<< WORD` one word. A text that does not lex gives no
    words (buildkit ignores that error there). Always with the backslash escape, as buildkit.
    """
    lexer = _Lexer(text, {}, "\\", raw_quotes=True, raw_escapes=True, skip_unset=True)
    try:
        return lexer.process()[1]
    except SubstitutionError:
        return []


def unquoted_words(text: str) -> list[str]:
    """Quotes removed, escapes and unset variables kept: buildkit's second look at a heredoc
    word (`<<"EOF"` names EOF). Raises SubstitutionError."""
    return _Lexer(text, {}, "\\", skip_unset=True).process()[1]


class _Words:
    """buildkit's wordsStruct: builds words from characters, splitting on unquoted spaces."""

    __slots__ = ("_buf", "_in_word", "words")

    def __init__(self) -> None:
        self._buf: list[str] = []
        self._in_word = False
        self.words: list[str] = []

    def add_char(self, ch: str) -> None:
        if ch in SPACE:
            if self._in_word and "".join(self._buf):
                self.words.append("".join(self._buf))
                self._buf = []
                self._in_word = False
        else:
            self.add_raw(ch)

    def add_string(self, text: str) -> None:
        for ch in text:
            self.add_char(ch)

    def add_raw(self, text: str) -> None:
        self._buf.append(text)
        self._in_word = True

    def finish(self) -> list[str]:
        # An empty quoted string marks a word but adds no character: it is dropped here.
        if "".join(self._buf):
            self.words.append("".join(self._buf))
            self._buf = []
            self._in_word = False
        return self.words


class _Lexer:
    """One pass over one text; the options are buildkit's Lex fields of the same names."""

    __slots__ = ("_env", "_escape", "_pos", "_raw_escapes", "_raw_quotes", "_skip_unset",
                 "_text")

    def __init__(self, text: str, env: Mapping[str, str], escape: str, *,
                 raw_quotes: bool = False, raw_escapes: bool = False,
                 skip_unset: bool = False) -> None:
        if escape not in ("\\", "`"):
            raise ValueError(f"invalid escape token {escape!r}")
        self._text = text
        self._pos = 0
        self._env = env
        self._escape = escape
        self._raw_quotes = raw_quotes
        self._raw_escapes = raw_escapes
        self._skip_unset = skip_unset

    def process(self) -> tuple[str, list[str]]:
        try:
            return self._stop_on("", self._raw_escapes)
        except SubstitutionError as exc:
            raise SubstitutionError(
                f"failed to process {json.dumps(self._text, ensure_ascii=False)}: {exc}"
            ) from None

    def _peek(self) -> str:
        """The next character, or "" at the end."""
        return self._text[self._pos] if self._pos < len(self._text) else ""

    def _next(self) -> str:
        ch = self._peek()
        if ch:
            self._pos += 1
        return ch

    def _stop_on(self, stop: str, raw_escapes: bool) -> tuple[str, list[str]]:
        """Process up to and including `stop` ("" for the end), giving (text, words)."""
        saved, self._raw_escapes = self._raw_escapes, raw_escapes
        try:
            result: list[str] = []
            words = _Words()
            while ch := self._peek():
                if stop and ch == stop:
                    self._next()
                    return "".join(result), words.finish()
                if ch == "$":
                    value = self._dollar()
                    result.append(value)
                    words.add_string(value)  # unquoted: a value with spaces is several words
                    continue
                if ch in "<'\"":
                    if ch == "<":
                        value = self._possible_heredoc()
                    elif ch == "'":
                        value = self._single_quote()
                    else:
                        value = self._double_quote()
                    result.append(value)
                    words.add_raw(value)
                    continue
                ch = self._next()
                if ch == self._escape:
                    if self._raw_escapes:
                        words.add_raw(ch)
                        result.append(ch)
                    ch = self._next()
                    if not ch:
                        break  # a trailing escape token is dropped
                    words.add_raw(ch)
                else:
                    words.add_char(ch)
                result.append(ch)
            if stop:
                raise SubstitutionError(
                    f"unexpected end of statement while looking for matching {stop}")
            return "".join(result), words.finish()
        finally:
            self._raw_escapes = saved

    def _single_quote(self) -> str:
        # Everything is literal up to the next single quote, which cannot be escaped.
        self._next()
        out = ["'"] if self._raw_quotes else []
        while True:
            ch = self._next()
            if not ch:
                raise SubstitutionError(
                    "unexpected end of statement while looking for matching single-quote")
            if ch == "'":
                if self._raw_quotes:
                    out.append(ch)
                return "".join(out)
            out.append(ch)

    def _double_quote(self) -> str:
        # Literal except `$`; the escape token escapes only `"`, `$` and itself.
        self._next()
        out = ['"'] if self._raw_quotes else []
        while True:
            ch = self._peek()
            if not ch:
                raise SubstitutionError(
                    "unexpected end of statement while looking for matching double-quote")
            if ch == '"':
                self._next()
                if self._raw_quotes:
                    out.append(ch)
                return "".join(out)
            if ch == "$":
                out.append(self._dollar())
                continue
            ch = self._next()
            if ch == self._escape:
                if self._raw_escapes:
                    out.append(ch)
                following = self._peek()
                if not following:
                    continue  # the loop then reports the missing quote
                if following in ('"', "$", self._escape):
                    ch = self._next()
            out.append(ch)

    def _possible_heredoc(self) -> str:
        # `<<` and the blanks after it stay with the next word, as buildkit keeps them.
        self._next()
        if self._peek() != "<":
            return "<"
        self._next()
        start = self._pos
        while self._peek() and self._peek() in _HEREDOC_SPACE:
            self._next()
        return "<<" + self._text[start:self._pos]

    def _name(self) -> str:
        if (ch := self._peek()) and ch.isdecimal():
            start = self._pos
            while self._peek() and self._peek().isdecimal():
                self._next()
            return self._text[start:self._pos]
        if ch and ch in _SPECIAL_PARAMS:
            return self._next()
        start = self._pos
        while (ch := self._peek()) and (ch.isalpha() or ch.isdecimal() or ch == "_"):
            self._next()
        return self._text[start:self._pos]

    def _lookup(self, name: str) -> str | None:
        return self._env.get(name)

    def _dollar(self) -> str:
        self._next()
        if self._peek() != "{":
            name = self._name()
            if not name:
                return "$"
            value = self._lookup(name)
            if value is None:
                return "$" + name if self._skip_unset else ""
            return value

        self._next()
        ch = self._peek()
        if not ch:
            raise SubstitutionError("syntax error: missing '}'")
        if ch in "{}:":
            raise SubstitutionError("syntax error: bad substitution")
        name = self._name()
        ch = self._next()
        if ch == "}":
            value = self._lookup(name)
            if value is None:
                return f"${{{name}}}" if self._skip_unset else ""
            return value
        if not ch:
            raise SubstitutionError("syntax error: missing '}'")
        if ch == "/":
            return self._replace(name)

        modifier = ch
        null_is_unset = ch == ":"
        if null_is_unset:
            ch = self._next()
            modifier += ch
        elif ch not in "+-?#%":
            raise SubstitutionError(f"unsupported modifier ({modifier}) in substitution")
        is_pattern = ch in ("#", "%")
        if null_is_unset and is_pattern:
            raise SubstitutionError(f"unsupported modifier ({modifier}) in substitution")
        # The pattern of # and % keeps its backslashes: they escape the wildcards.
        word = self._modifier_word("}", is_pattern, "syntax error: missing '}'")

        value = self._lookup(name)
        if value is None and self._skip_unset:
            return f"${{{name}{modifier}{word}}}"
        is_unset = value is None or (null_is_unset and value == "")
        if ch == "-":
            return word if is_unset else value or ""
        if ch == "+":
            return "" if is_unset else word
        if ch == "?":
            if value is None:
                raise SubstitutionError(f"{name}: {word or 'is not allowed to be unset'}")
            if null_is_unset and value == "":
                raise SubstitutionError(f"{name}: {word or 'is not allowed to be empty'}")
            return value
        if ch in ("#", "%"):
            greedy = word.startswith(ch)  # ## and %% take the longest match
            if greedy:
                word = word[1:]
            if ch == "%":
                return _trim_suffix(word, value or "", greedy)
            return _trim_prefix(word, value or "", greedy)
        raise SubstitutionError(f"unsupported modifier ({modifier}) in substitution")

    def _modifier_word(self, stop: str, raw_escapes: bool, missing: str) -> str:
        try:
            return self._stop_on(stop, raw_escapes)[0]
        except SubstitutionError:
            if not self._peek():
                raise SubstitutionError(missing) from None
            raise

    def _replace(self, name: str) -> str:
        replace_all = self._peek() == "/"
        if replace_all:
            self._next()
        pattern = self._modifier_word("/", True, "syntax error: missing '/' in ${}")
        replacement = self._modifier_word("}", True, "syntax error: missing '}'")
        value = self._lookup(name)
        if value is None and self._skip_unset:
            return f"${{{name}/{pattern}/{replacement}}}"
        regex = _pattern_regex(pattern, greedy=True, anchored=False)
        # The replacement is literal text (no group references).
        return regex.sub(lambda _: replacement, value or "", count=0 if replace_all else 1)


def _pattern_regex(pattern: str, *, greedy: bool, anchored: bool) -> re.Pattern[str]:
    """A ${NAME#pattern} pattern as a regex: `*` any string (shortest unless greedy), `?` one
    character, `\\` escapes `*`, `?` or itself; `\\}` and `\\/` are the characters."""
    out = ["^"] if anchored else []
    i = 0
    while i < len(pattern):
        tok = pattern[i]
        i += 1
        if tok == "*":
            out.append(".*" if greedy else ".*?")
        elif tok == "?":
            out.append(".")
        elif tok == "\\":
            following = pattern[i : i + 1]
            if following in ("}", "/"):
                continue  # escaped so as not to end the ${}; the next turn adds it
            i += 1
            if following not in ("*", "?", "\\"):
                raise SubstitutionError(
                    f"invalid pattern ({pattern}) in substitution: invalid escape '\\{following}'")
            out.append("\\" + following)
        else:
            out.append(re.escape(tok))
    return re.compile("".join(out))


def _trim_prefix(pattern: str, value: str, greedy: bool) -> str:
    match = _pattern_regex(pattern, greedy=greedy, anchored=True).search(value)
    return value[match.end():] if match else value


def _reverse_pattern(pattern: str) -> str:
    """`pattern` reversed with each escape kept before the character it escapes."""
    tokens: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\" and i + 1 < len(pattern):
            tokens.append(pattern[i : i + 2])
            i += 2
        else:
            tokens.append(pattern[i])
            i += 1
    return "".join(reversed(tokens))


def _trim_suffix(pattern: str, value: str, greedy: bool) -> str:
    # A regex cannot find the shortest match that ends the string; reversing both the
    # pattern and the value turns it into a prefix search (as buildkit does).
    return _trim_prefix(_reverse_pattern(pattern), value[::-1], greedy)[::-1]
