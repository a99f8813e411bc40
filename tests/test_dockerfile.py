"""The Dockerfile package against docker's own cases.

Expected values come from buildkit (`frontend/dockerfile/parser/testfiles`,
`shell/envVarTest`, `shell/wordsTest`, `shell/lex_test.go`, `instructions/parse.go`) and
moby/patternmatcher (`patternmatcher_test.go`, Go's filepath.Match tests). Pure functions:
no mounts, no files.
"""

from __future__ import annotations

import pytest

from layerfs.dockerfile import arguments
from layerfs.dockerfile.expand import SubstitutionError, expand, expand_words
from layerfs.dockerfile.ignore import IgnoreRules, has_magic, match
from layerfs.dockerfile.parse import Dockerfile, Instruction, parse
from layerfs.errors import DockerfileError


def body(text: str) -> tuple[Instruction, ...]:
    """The instructions of one stage `FROM scratch` + text."""
    return parse("FROM scratch\n" + text).stages[0].instructions


def only(text: str) -> Instruction:
    (instruction,) = body(text)
    return instruction


# ---------------------------------------------------------------------------- structure
def test_stages_meta_args_and_steps() -> None:
    df = parse(
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=alpine\n"
        "FROM --platform=linux/amd64 $BASE AS Build\n"
        "RUN make\n"
        "\n"
        "from build as second\n"
        "COPY --from=build /out /out\n"
        "FROM scratch\n",
        "ctx/Dockerfile.dev",
    )
    assert isinstance(df, Dockerfile)
    assert df.path == "ctx/Dockerfile.dev"
    assert df.escape == "\\"
    assert [i.args for i in df.meta_args] == ["BASE=alpine"]
    assert [(s.index, s.name, s.base, s.platform) for s in df.stages] == [
        (0, "build", "$BASE", "linux/amd64"),
        (1, "second", "build", None),
        (2, None, "scratch", None),
    ]
    assert [i.keyword for i in df.stages[0].instructions] == ["RUN"]
    assert df.stages[1].from_.original == "from build as second"
    assert df.stages[1].from_.keyword == "FROM"
    assert [i.line for i in df.instructions] == [2, 3, 4, 6, 7, 8]
    assert df.stages[2].instructions == ()


def test_instruction_fields() -> None:
    copy = only('COPY --chown="1:2" --link  a  b /dst/')
    assert copy.keyword == "COPY"
    assert copy.args == "a  b /dst/"
    assert copy.flags == (("chown", "1:2"), ("link", ""))
    assert copy.flag("chown") == "1:2"
    assert copy.flag("link") == ""
    assert copy.flag("from") is None
    assert copy.original == 'COPY --chown="1:2" --link  a  b /dst/'
    assert copy.json_args is None
    assert copy.onbuild is None
    assert copy.line == 2


def test_double_dash_ends_the_flags() -> None:
    # buildkit testfiles/flags
    assert only("COPY -- foo /tmp/").args == "foo /tmp/"
    copy = only("COPY --link -- --odd-name /dst")
    assert (copy.flags, copy.args) == ((("link", ""),), "--odd-name /dst")
    copy = only('COPY --chown=a\\ b --from="x y" "--not-a-flag" /dst')  # quotes, escapes removed
    assert copy.flags == (("chown", "a b"), ("from", "x y"))
    assert copy.args == '"--not-a-flag" /dst'


def test_flags_unknown_for_an_instruction() -> None:
    with pytest.raises(DockerfileError, match=r"^Dockerfile:2: unknown flag: --doit$"):
        parse("FROM a\nCMD --doit [ 'a' ]\n")


# ---------------------------------------------------------------------------- lines
def test_continuations_as_docker_joins_them() -> None:
    # buildkit testfiles/continueIndent
    text = (
        "RUN echo hello\\\n  world\\\n  goodnight  \\\n  moon\\\n  light\\\nning\n"
        "RUN echo hello  \\\n  world\n"
        "RUN echo hello \\\ngoodbye\\\nfrog\n"
        "RUN echo hello  \\  \nworld\n"
        "RUN echo hi \\\n \\\n world \\\n\\\n good\\\n\\\nnight\n"
        "RUN echo hello \\\n# this is a comment\n\n# comment with a blank line around it\n\n"
        "this is some more useful stuff\n"
    )
    assert [i.args for i in body(text)] == [
        "echo hello  world  goodnight    moon  lightning",
        "echo hello    world",
        "echo hello goodbyefrog",
        "echo hello  world",
        "echo hi   world  goodnight",
        "echo hello this is some more useful stuff",
    ]
    assert [i.line for i in body(text)] == [2, 8, 10, 13, 15, 22]


def test_comment_inside_continuation_and_original_on_one_line() -> None:
    run = only("RUN apt-get update && \\\n    # refresh first\n    apt-get install -y x\n")
    assert run.args == "apt-get update &&     apt-get install -y x"
    assert run.original == "RUN apt-get update &&     apt-get install -y x"


def test_continuation_at_end_of_file_crlf_and_bom() -> None:
    assert only("RUN something \\").args == "something"  # testfiles/continue-at-eof
    df = parse("\ufeffFROM a\r\nRUN one \\\r\n  two\r\n")
    assert [i.args for i in df.instructions] == ["a", "one   two"]


def test_escaped_escape_is_not_a_continuation() -> None:
    # testfiles/trailing-backslash
    env = body("ENV C trailing\\\\backslash\\\\\nENV D This should not be appended to C\n")
    assert [i.args for i in env] == [
        "C trailing\\\\backslash\\\\", "D This should not be appended to C"]


# ---------------------------------------------------------------------------- directives
def test_escape_directive_backtick_for_windows_paths() -> None:
    df = parse(
        "# escape=`\n"
        "\n"
        "FROM mcr.microsoft.com/windows/servercore\n"
        "COPY testfile.txt c:\\\n"
        "RUN dir c:\\\n"
        "ENV GOPATH `\n"
        "\\go\n"
    )
    assert df.escape == "`"
    copy, run, env = df.stages[0].instructions
    assert arguments.words(copy) == ["testfile.txt", "c:\\"]
    assert run.args == "dir c:\\"
    assert env.args == "GOPATH \\go"
    assert expand("c:\\Program` Files\\x", {}, escape=df.escape) == "c:\\Program Files\\x"


def test_same_windows_paths_with_default_escape_continue_the_line() -> None:
    (copy,) = body("COPY testfile.txt c:\\\nRUN dir c:\\\n")
    assert copy.args == "testfile.txt c:RUN dir c:"


@pytest.mark.parametrize(
    ("head", "escape"),
    [
        ("#escape = `\n", "`"),  # testfiles/escape
        ("# ESCAPE=`\n", "`"),
        ("  # escape=`\n", "`"),
        ("# syntax = docker/dockerfile\n# escape = `\n\n", "`"),  # escape-with-syntax
        ("# Comment here, not a directive.\n# escape = `\n\n", "\\"),  # escape-after-comment
        ("\n# escape=`\n", "\\"),  # after a blank line: a comment
        ("# unknown=1\n# escape=`\n", "\\"),
        ("# escape=\\\n", "\\"),
    ],
)
def test_directive_only_at_the_very_top(head: str, escape: str) -> None:
    assert parse(head + "FROM image\n").escape == escape


def test_directive_after_a_comment_leaves_backslash_continuation() -> None:
    df = parse("# a comment\n# escape = `\n\nFROM image\nENV GOPATH \\\n\\go")
    assert df.stages[0].instructions[0].args == "GOPATH \\go"


# ---------------------------------------------------------------------------- JSON form
@pytest.mark.parametrize(
    ("line", "json_args"),
    [
        ("CMD []", ()),
        ('CMD [""]', ("",)),
        ('CMD [ "a", "b" ]', ("a", "b")),
        ('CMD\t[\t"a",\t"b"\t]\t', ("a", "b")),
        ('CMD ["abc 123", "♥", "\\" \\\\ \\/ \\n \\u0000"]', ("abc 123", "♥", '" \\ / \n \x00')),
        ('ENTRYPOINT [ "/usr/bin/redis-server" ]', ("/usr/bin/redis-server",)),
        ('COPY [ "test file", "/tmp" ]', ("test file", "/tmp")),
        ('VOLUME ["/data"]', ("/data",)),
        ('RUN ["sh", "-c", "echo hi"]', ("sh", "-c", "echo hi")),
        # malformed JSON is the shell form (testfiles/jeztah-invalid-json-*)
        ("CMD ['echo','single quotes are invalid JSON']", None),
        ('CMD ["echo", "Please, close the brackets when you\'re done"', None),
        ('CMD ["echo", "look ma, no quote!]', None),
        ("CMD '[\"echo\", \"JSON in a string\"]'", None),
        ('CMD ["a"] trailing', None),
        ("CMD [NaN]", None),
        ("CMD echo [a]", None),
        ('EXPOSE ["80"]', None),  # no JSON form for EXPOSE
    ],
)
def test_json_or_shell_form(line: str, json_args: tuple[str, ...] | None) -> None:
    instruction = only(line)
    assert instruction.json_args == json_args
    if json_args is None:
        assert instruction.args == line.split(None, 1)[1].strip()


def test_json_array_of_non_strings_is_an_error() -> None:
    with pytest.raises(DockerfileError, match=r"^Dockerfile:2: when using JSON array syntax"):
        parse('FROM a\nCMD [ "echo", [ "nested json" ] ]\n')


def test_healthcheck_json_part_and_config() -> None:
    check = only('HEALTHCHECK --interval=5s --timeout=3s --retries=3 \\\n  CMD ["foo", "-q"]')
    assert check.json_args == ("foo", "-q")
    assert arguments.healthcheck(check) == arguments.Healthcheck(
        test=("CMD", "foo", "-q"), interval=5 * 10**9, timeout=3 * 10**9, retries=3)
    shell = arguments.healthcheck(only("HEALTHCHECK   CMD   /app/check.sh --quiet"))
    assert shell.test == ("CMD-SHELL", "/app/check.sh --quiet")
    assert arguments.healthcheck(only("HEALTHCHECK none")).test == ("NONE",)


@pytest.mark.parametrize(
    ("text", "ns"),
    [("0", 0), ("300ms", 300_000_000), ("1m30s", 90 * 10**9), ("1.5h", 5400 * 10**9),
     ("2us", 2000), ("2µs", 2000), ("-1.5s", -1_500_000_000), (".5s", 500_000_000)],
)
def test_go_durations(text: str, ns: int) -> None:
    assert arguments.duration(text) == ns


@pytest.mark.parametrize("text", ["", "5", "1x", ".s", "s", "1.5"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError, match="time: "):
        arguments.duration(text)


# ---------------------------------------------------------------------------- ONBUILD
def test_onbuild_parses_its_trigger() -> None:
    onbuild = only("ONBUILD COPY --from=x a \\\n  /b")
    assert onbuild.args == "COPY --from=x a   /b"
    inner = onbuild.onbuild
    assert inner is not None
    assert (inner.keyword, inner.args, inner.flags, inner.line) == (
        "COPY", "a   /b", (("from", "x"),), 2)
    assert inner.original == "COPY --from=x a   /b"
    exec_form = only('onbuild run ["echo", "test"]').onbuild
    assert exec_form is not None and exec_form.json_args == ("echo", "test")


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FROM a\nFOO bar\n", "Df:2: unknown instruction: FOO"),
        ("FROM a\nRUNN make\n", "Df:2: unknown instruction: RUNN (did you mean RUN?)"),
        ("", "Df:1: no FROM instruction"),
        ("# only comments\n\n", "Df:1: no FROM instruction"),
        ("\n\nARG A\nARG B\n", "Df:3: no FROM instruction"),
        ("ARG A\nRUN x\nFROM a\n", "Df:2: RUN before the first FROM"),
        ("FROM\n", "Df:1: FROM requires an image"),
        ("FROM a AS\n", "Df:1: FROM requires either one or three arguments"),
        ("FROM a AS b c\n", "Df:1: FROM requires either one or three arguments"),
        ("FROM a b\n", "Df:1: FROM requires either one or three arguments"),
        ("FROM a AS 1st\n", 'Df:1: invalid name for build stage: "1st"'),
        ("FROM a AS b$c\n", 'Df:1: invalid name for build stage: "b$c"'),
        ("FROM a AS x\nRUN y\nFROM b as X\n", 'Df:3: duplicate stage name "x"'),
        ("FROM a\nCOPY x\n", "Df:2: COPY requires at least two arguments, but only one"),
        ("FROM a\nADD --chown=1 \\\n x\n", "Df:2: ADD requires at least two arguments"),
        ("FROM a\nCOPY --from=b\n", "Df:2: COPY requires at least two arguments"),
        ("FROM a\nRUN\n", "Df:2: RUN requires at least one argument"),
        ("FROM a\nEXPOSE\n", "Df:2: EXPOSE requires at least one argument"),
        ("FROM a\nVOLUME\n", "Df:2: VOLUME requires at least one argument"),
        ('FROM a\nVOLUME ["/a", " "]\n', "Df:2: VOLUME specified can not be an empty string"),
        ("FROM a\nWORKDIR\n", "Df:2: WORKDIR requires exactly one argument"),
        ("FROM a\nUSER\n", "Df:2: USER requires exactly one argument"),
        ("FROM a\nENV\n", "Df:2: ENV requires at least one argument"),
        ("FROM a\nENV PATH\n", "Df:2: ENV must have two arguments"),  # testfiles-negative
        ("FROM a\nLABEL =x\n", "Df:2: LABEL names can not be blank"),
        ("FROM a\nENV a=b c\n", 'Df:2: Syntax error - can\'t find = in "c"'),
        ("FROM a\nARG\n", "Df:2: ARG requires at least one argument"),
        ("FROM a\nARG =x\n", "Df:2: ARG names can not be blank"),
        ("FROM a\nSHELL\n", "Df:2: SHELL requires at least one argument"),
        ("FROM a\nSHELL /bin/bash -c\n", "Df:2: SHELL requires the arguments to be in JSON"),
        ("FROM a\nHEALTHCHECK\n", "Df:2: HEALTHCHECK requires at least one argument"),
        ("FROM a\nHEALTHCHECK CONNECT TCP 7000\n", 'Df:2: Unknown type "CONNECT" in HEALTHCHECK'),
        ("FROM a\nHEALTHCHECK CMD\n", "Df:2: Missing command after HEALTHCHECK CMD"),
        ("FROM a\nHEALTHCHECK NONE x\n", "Df:2: HEALTHCHECK NONE takes no arguments"),
        ("FROM a\nHEALTHCHECK --retries=-1 CMD x\n", "Df:2: --retries cannot be negative"),
        ("FROM a\nHEALTHCHECK --timeout=1us CMD x\n", 'Df:2: Interval "timeout" cannot be less'),
        ("FROM a\nHEALTHCHECK --interval=5 CMD x\n", "Df:2: time: missing unit"),
        ("FROM a\nONBUILD\n", "Df:2: ONBUILD requires at least one argument"),
        ("FROM a\nONBUILD ONBUILD RUN x\n", "Df:2: Chaining ONBUILD via `ONBUILD ONBUILD`"),
        ("FROM a\nONBUILD from b\n", "Df:2: FROM isn't allowed as an ONBUILD trigger"),
        ("FROM a\nONBUILD MAINTAINER me\n", "Df:2: MAINTAINER isn't allowed as an ONBUILD"),
        ("FROM a\nONBUILD NOPE x\n", "Df:2: unknown instruction: NOPE"),
        ("FROM a\nCOPY --user=me foo /tmp/\n", "Df:2: unknown flag: --user"),
        ("FROM a\nCOPY --checksum=sha256:0 a b\n", "Df:2: unknown flag: --checksum"),
        ("FROM a\nFROM --platform linux b\n", "Df:2: missing a value on flag: --platform"),
        ("FROM a\nCOPY --from=a --from=b x y\n", "Df:2: duplicate flag specified: --from"),
        ("FROM a\nCOPY --link= x y\n", "Df:2: missing a value on flag: --link"),
        ("FROM a\nADD --keep-git-dir=yes x y\n", "Df:2: expecting boolean value for flag"),
        ("FROM a\nENV --x=1 A=b\n", "Df:2: unknown flag: --x"),
        ("FROM a\nRUN --mount=type=cache,target=/x make\n", "Df:2: RUN --mount is not supported"),
        ("FROM a\nRUN --network=none make\n", "Df:2: RUN --network is not supported"),
        ("FROM a\nRUN --security=insecure make\n", "Df:2: RUN --security is not supported"),
        ("# escape=x\nFROM a\n", "Df:1: invalid escape token 'x' does not match ` or \\"),
        ("# escape=`\n# escape=\\\nFROM a\n", "Df:2: only one escape parser directive"),
        ("FROM a\nRUN <<EOF\necho hi\nEOF\n", "Df:2: heredocs are not supported"),
        ("FROM a\nRUN cat <<-'EOT' > /x\nEOT\n", "Df:2: heredocs are not supported"),
        ("FROM a\nCOPY <<EOF /etc/x\nEOF\n", "Df:2: heredocs are not supported"),
        ("FROM a\nONBUILD RUN 3<< END cat\n", "Df:2: heredocs are not supported"),
    ],
)
def test_errors_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(DockerfileError) as info:
        parse(text, "Df")
    assert str(info.value).startswith(message)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    "line",
    [
        "RUN echo $((1<<4))",
        'RUN echo "<<EOF"',
        "RUN cat <<<word",
        'RUN ["cat", "<<EOF"]',
        "CMD cat <<EOF",  # only RUN, COPY and ADD take heredocs
    ],
)
def test_double_less_than_that_is_no_heredoc(line: str) -> None:
    assert only(line).keyword == line.split()[0]


def test_accepted_flags() -> None:
    (add,) = body("ADD --chown=u:g --chmod=644 --link=true --checksum=sha256:00 --keep-git-dir"
                  " https://x/y.tgz /z\n")
    assert add.flags == (("chown", "u:g"), ("chmod", "644"), ("link", "true"),
                         ("checksum", "sha256:00"), ("keep-git-dir", ""))
    (check,) = body("HEALTHCHECK --start-period=0s --start-interval=0s --interval=5s "
                    "--timeout=0s --retries=0 CMD [\"foo\"]\n")
    assert [name for name, _ in check.flags] == [
        "start-period", "start-interval", "interval", "timeout", "retries"]


# ---------------------------------------------------------------------------- expand
ENV = {"PWD": "/home", "SHELL": "bash", "KOREAN": "한국어", "NULL": ""}


@pytest.mark.parametrize(
    ("word", "expected"),
    [  # buildkit shell/envVarTest (Unix)
        ("hello", "hello"), ("he'll'o", "hello"), ("he\\'llo", "he'llo"),
        ("abc\\tdef", "abctdef"), ('"abc\\tdef"', "abc\\tdef"), ('"abc\\\\tdef"', "abc\\tdef"),
        ("'abc\\tdef'", "abc\\tdef"), ("hello\\", "hello"), ("hello\\\\", "hello\\"),
        ('"hel\'lo"', "hel'lo"), ("'hello\\'", "hello\\"), ("'hello\\\\there'", "hello\\\\there"),
        ('"\'\'"', "''"), ("$.", "$."), ("he$1x", "hex"), ("he$.x", "he$.x"), ("he$pwd.", "he."),
        ("he$PWD", "he/home"), ("he\\$PWD", "he$PWD"), ("he\\\\$PWD", "he\\/home"),
        ('"he\\$PWD"', "he$PWD"), ('"he\\\\$PWD"', "he\\/home"), ("\\${}", "${}"),
        ("he\\${}xx", "he${}xx"), ("he${hi}xx", "hexx"), ("he${PWD}", "he/home"),
        ("he${XXX:-000}xx", "he000xx"), ("he${PWD:-000}xx", "he/homexx"),
        ("he${XXX:-$PWD}xx", "he/homexx"), ("he${XXX:-${PWD:-yyy}}xx", "he/homexx"),
        ("he${XXX:-${YYY:-yyy}}xx", "heyyyxx"), ("he${PWD?}", "he/home"), ("he${NULL?}", "he"),
        ("he${XXX:+${PWD}}xx", "hexx"), ("he${PWD:+${SHELL}}xx", "hebashxx"),
        ("he${PWD:+000}xx", "he000xx"), ("'he${XX}'", "he${XX}"), ('"he\'$PWD\'"', "he'/home'"),
        ("'\\$PWD'", "\\$PWD"), ("'\"hello\"'", '"hello"'),
        ("he${PWD:+${PWD}:}xx", "he/home:xx"), ("he${XXX:-\\$PWD:}xx", "he$PWD:xx"),
        ("he${XXX:-\\${PWD}z}xx", "he${PWDz}xx"), ("안'녕'하세요", "안녕하세요"),
        ("안녕$KOREAN", "안녕한국어"), ("${aaa}}", "}"), ("${aaa:-bbb}}", "bbb}"),
        ("${aaa:-bbb {foo}", "bbb {foo"), ("${aaa:-${bbb:-ccc}}", "ccc"),
        ("$1", ""), ("${999:-bbb}aaa", "bbbaaa"), ("$001aaa", "aaa"), ("${001:+bbb}", ""),
        ("$@@@", "@@"), ("${@:-bbb}aaa", "bbbaaa"), ("$*", ""), ("${#}", ""), ("$?", ""),
        ("${-:-bbb}", "bbb"), ("$$", ""), ("${!}", ""), ("${0:-bbb}", "bbb"),
    ],
)
def test_expand_buildkit_env_var_cases(word: str, expected: str) -> None:
    assert expand(word, ENV) == expected


@pytest.mark.parametrize(
    "word",
    [  # buildkit shell/envVarTest errors
        "he'llo", "he\\\\'llo", '"hello', '"hello\\"', "'hello", "${}", "he${}xx", "he${.}",
        "he${XXX:YYY}", "he${XXX?}", "he${XXX:?}", "he${NULL:?}", "he${PWD", "he${PWD:=000}xx",
        "${{aaa}", "${aaa", "${{aaa:-bbb}", "${aaa:-bbb", "${aaa:-bbb ${foo}", "${:}",
        "${:-bbb}", "${:+bbb}", "${#PWD}", "${FOO=aaa}", "${FOO:#}", "${FOO:%%}",
        "${PWD//ww}", "${PWD//}",
    ],
)
def test_expand_errors(word: str) -> None:
    with pytest.raises(SubstitutionError, match=r"^failed to process "):
        expand(word, ENV)


@pytest.mark.parametrize(
    ("word", "env", "expected"),
    [  # buildkit lex_test.go TestProcessWithMatches
        ("${FOO-aaa} ${BAR-bbb} ${BAZ-ccc}", {"FOO": "xxx", "BAR": ""}, "xxx  ccc"),
        ("${FOO:-aaa} ${BAR:-bbb} ${BAZ:-ccc}", {"FOO": "xxx", "BAR": ""}, "xxx bbb ccc"),
        ("${FOO:-}", {}, ""),
        ("${FOO+aaa} ${BAR+bbb} ${BAZ+ccc}", {"FOO": "xxx", "BAR": ""}, "aaa bbb "),
        ("${FOO:+aaa} ${BAR:+bbb} ${BAZ:+ccc}", {"FOO": "xxx", "BAR": ""}, "aaa  "),
        ("${BAR?bbb}", {"BAR": ""}, ""),
        ("${FOO#()[]{\\}^$.\\*\\?|\\\\}", {"FOO": "()[]{}^$.*?|\\x"}, "x"),
        ("${FOO%%\\**}", {"FOO": "xx**"}, "xx"),
        ("${FOO#*x*y}", {"FOO": "xxyy"}, "y"),
        ("${FOO#*}", {"FOO": "xxyy"}, "xxyy"),
        ("${FOO#$BAR}", {"FOO": "xxyy", "BAR": "x"}, "xyy"),
        ("${FOO##*x}", {"FOO": "xxyy"}, "yy"),
        ("${FOO#?\\?}", {"FOO": "???y"}, "?y"),
        ("${ABC:-.}${FOO%x}${ABC:-.}", {"FOO": "xxyy"}, ".xxyy."),
        ("${FOO%%\\**\\*}", {"FOO": "a***yy*"}, "a"),
        ("${FOO/$NEEDLE/.} - ${FOO//$NEEDLE/.}", {"FOO": "/foo*/*/*.txt", "NEEDLE": "\\*/"},
         "/foo.*/*.txt - /foo..*.txt"),
        ("${FOO/$NEEDLE/} - ${FOO//$NEEDLE/}", {"FOO": "/tmp/tmp/bar.txt", "NEEDLE": "/tmp"},
         "/tmp/bar.txt - /bar.txt"),
        ("${FOO/$N/$R}", {"FOO": "http://google.de", "N": "http://", "R": "https://"},
         "https://google.de"),
        ("${FOO//\\//\\/}", {"FOO": "/tmp/foo.txt"}, "\\/tmp\\/foo.txt"),
        ("${FOO///}", {"FOO": "xxyy"}, "xxyy"),
        ("v${V}-${ARCH}${VARIANT:+-${VARIANT}}", {"V": "1", "ARCH": "arm64", "VARIANT": ""},
         "v1-arm64"),
        ("v${V}-${ARCH}${VARIANT:+-${VARIANT}}", {"V": "1", "ARCH": "arm", "VARIANT": "v7"},
         "v1-arm-v7"),
    ],
)
def test_expand_modifiers(word: str, env: dict[str, str], expected: str) -> None:
    assert expand(word, env) == expected


def test_mandatory_variable_messages() -> None:
    # lex_test.go TestShellParserMandatoryEnvVars: the message is itself expanded
    with pytest.raises(SubstitutionError, match="VAR: message herex"):
        expand("${VAR:?message here$ARG}", {"VAR": "", "ARG": "x"})
    with pytest.raises(SubstitutionError, match="VAR: is not allowed to be unset"):
        expand("${VAR?}", {})
    assert expand("${VAR?message here$ARG}", {"VAR": "", "ARG": "x"}) == ""


def test_backtick_escape_leaves_backslashes_alone() -> None:
    assert expand("C:\\Users\\$NAME", {"NAME": "me"}, escape="`") == "C:\\Users\\me"
    assert expand('"a`"b" `$X c`', {"X": "1"}, escape="`") == 'a"b $X c'
    assert expand("a\\$X", {"X": "1"}) == "a$X"


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [  # buildkit shell/wordsTest
        ("hello", {}, ["hello"]),
        ("hello${hi}bye", {}, ["hellobye"]),
        ("hello${hi}bye", {"hi": "hi"}, ["hellohibye"]),
        ("hello${space}bye", {"space": "abc  def"}, ["helloabc", "defbye"]),
        ('hello"${space}"bye', {"space": "abc  def"}, ["helloabc  defbye"]),
        ('hello "${space}"bye', {"space": "abc  def"}, ["hello", "abc  defbye"]),
        ("hello${leading}def", {"leading": "  ab c"}, ["hello", "ab", "cdef"]),
        ('hello"${leading}" def', {"leading": "  ab c"}, ["hello  ab c", "def"]),
        ("hello${trailing}d", {"trailing": "ab c   "}, ["helloab", "c", "d"]),
        ('hel"lo${trailing}"', {"trailing": "ab c   "}, ["helloab c   "]),
        ('hello" there  "', {}, ["hello there  "]),
        ("hello there     ", {}, ["hello", "there"]),
        ("hello\\ there", {}, ["hello there"]),
        ('hello\\" there', {}, ['hello"', "there"]),
        ('hello"\\\\there"', {}, ["hello\\there"]),
        ('hello"\\there"', {}, ["hello\\there"]),
        ("hello'\\\\there'", {}, ["hello\\\\there"]),
        ("hello'$there'", {}, ["hello$there"]),
        ('a "" b', {}, ["a", "b"]),
        ("a${X:-b} c", {}, ["ab", "c"]),
    ],
)
def test_expand_words(text: str, env: dict[str, str], expected: list[str]) -> None:
    assert expand_words(text, env) == expected


def test_expand_words_error() -> None:
    with pytest.raises(SubstitutionError, match="double-quote"):
        expand_words('hello" there', {})


# ---------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("args", "pairs"),
    [  # buildkit testfiles/env: keys and values keep their quotes and escapes
        ("name value", [("name", "value")]),
        ("name  some   value ", [("name", "some   value")]),
        ("REFRESHED_AT 2014-06-01", [("REFRESHED_AT", "2014-06-01")]),
        ('maintainer James Turnbull "james@example.com"',
         [("maintainer", 'James Turnbull "james@example.com"')]),
        ("name=value", [("name", "value")]),
        ("name=value name2=value2", [("name", "value"), ("name2", "value2")]),
        ('name="value value1"', [("name", '"value value1"')]),
        ("name=value\\ value2", [("name", "value\\ value2")]),
        ("name=\"value'quote space'value2\"", [("name", "\"value'quote space'value2\"")]),
        ("name='a\\'b'", [("name", "'a\\'b'")]),
        ('name="a\\"b"', [("name", '"a\\"b"')]),
        ('name=""', [("name", '""')]),
        ("name=", [("name", "")]),
        ('a=1 b="x  y" c=', [("a", "1"), ("b", '"x  y"'), ("c", "")]),
    ],
)
def test_key_values(args: str, pairs: list[tuple[str, str]]) -> None:
    assert arguments.key_values(args.strip(), "ENV") == pairs


def test_key_values_then_expand_like_the_builder() -> None:
    pairs = arguments.key_values('A="x y" B=$A\\ z', "ENV")
    env: dict[str, str] = {}
    for key, value in pairs:
        env[expand(key, env)] = expand(value, env)
    assert env == {"A": "x y", "B": "x y z"}


def test_key_values_follow_the_escape_token() -> None:
    assert arguments.key_values("A=C:\\ B=1", "ENV", escape="`") == [("A", "C:\\"), ("B", "1")]
    assert arguments.key_values("A=x` y", "ENV", escape="`") == [("A", "x` y")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("", "LABEL requires at least one argument"),
        ("PATH", "LABEL must have two arguments"),
        ("=x", "LABEL names can not be blank"),
        ("a=b c d=e", "Syntax error - can't find = in \"c\". Must be of the form: name=value"),
    ],
)
def test_key_values_errors(args: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        arguments.key_values(args, "label")
    assert str(info.value) == message


def test_arg_definitions() -> None:
    assert arguments.arg_definitions('abc="123 456" def') == [("abc", '"123 456"'), ("def", None)]
    assert arguments.arg_definitions("foo bar=baz e=") == [("foo", None), ("bar", "baz"), ("e", "")]
    assert arguments.arg_definitions("V=${BASE:-1}-x") == [("V", "${BASE:-1}-x")]
    with pytest.raises(ValueError, match="ARG names can not be blank"):
        arguments.arg_definitions("=x")


def test_words_and_command() -> None:
    copy = only("COPY\t.\t/go/src/app")
    assert arguments.words(copy) == [".", "/go/src/app"]
    # no quoting in the shell form: docker leaves `"a` and `b"` to the lexer
    assert arguments.words(only('COPY "a b" /x')) == ['"a', 'b"', "/x"]
    assert arguments.words(only('ADD [ "test file", "/tmp/test file" ]')) == [
        "test file", "/tmp/test file"]
    assert arguments.words(only("EXPOSE 80/tcp  443")) == ["80/tcp", "443"]
    assert arguments.command(only("RUN echo $HOME")) == ["/bin/sh", "-c", "echo $HOME"]
    assert arguments.command(only("RUN echo a"), ["cmd", "/S", "/C"]) == [
        "cmd", "/S", "/C", "echo a"]
    assert arguments.command(only('ENTRYPOINT ["/bin/app", "$X"]')) == ["/bin/app", "$X"]
    assert arguments.command(only("CMD []")) == []
    assert arguments.command(only("ENTRYPOINT")) == []


# ---------------------------------------------------------------------------- .dockerignore
@pytest.mark.parametrize(
    ("pattern", "path", "excluded"),
    [  # patternmatcher_test.go TestMatches (MatchesOrParentMatches)
        ("**", "file", True), ("**", "file/", True), ("**/", "file", True),
        ("**/", "file/", True), ("**", "dir/file", True), ("**", ".", False),
        ("**/", "dir/file", True), ("**/**", "dir/file", True), ("dir/**", "dir/file", True),
        ("dir/**", "dir/dir2/file", True), ("**/dir", "dir", True), ("**/dir", "dir/file", True),
        ("**/dir2/*", "dir/dir2/file", True), ("**/dir2/**", "dir/dir2/dir3/file", True),
        ("**file", "file", True), ("**file", "dir/file", True), ("**/file", "dir/file", True),
        ("**file", "dir/dir/file", True), ("**/file*", "dir/dir/file.txt", True),
        ("**/file*txt", "dir/dir/file.txt", True), ("**/**/*.txt", "dir/dir/file.txt", True),
        ("**/**/*.txt2", "dir/dir/file.txt", False), ("**/*.txt", "file.txt", True),
        ("a**/*.txt", "a/dir/dir/file.txt", True), ("a/*.txt", "a/dir/file.txt", False),
        ("a/*.txt", "a/file.txt", True), ("a/*.txt**", "a/file.txt", True),
        ("a[b-d]e", "ae", False), ("a[b-d]e", "ace", True), ("a[^b-d]e", "aze", True),
        (".*", ".foo", True), (".*", "foo", False), ("abc.def", "abcdef", False),
        ("abc.def", "abc.def", True), ("abc?def", "abcZdef", True), ("abc?def", "abcdef", False),
        ("a\\\\", "a\\", True), ("**/foo/bar", "foo/bar", True),
        ("**/foo/bar", "dir/dir2/foo/bar", True), ("abc/**", "abc", False),
        ("abc/**", "abc/def/ghi", True), ("**/.foo", ".foo", True), ("**/.foo", "bar.foo", False),
        ("a(b)c/def", "a(b)c/def", True), ("a.|)$(}+{bc", "a.|)$(}+{bc", True),
        ("dist/*.whl", "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", True),
        ("a\\*b", "a*b", True), ("a*", "ab/c", True), ("a*/b", "a/c/b", False),
        ("**.txt", "deep/x.txt", True),  # `**` at the start: any suffix
        ("node_modules", "node_modules/pkg/index.js", True),  # a parent matches
        ("/build/", "build/out.o", True), ("./docs/../src", "src/main.c", True),
    ],
)
def test_ignore_single_pattern(pattern: str, path: str, excluded: bool) -> None:
    assert IgnoreRules.parse(pattern).excluded(path) is excluded


@pytest.mark.parametrize(
    ("lines", "path", "excluded"),
    [
        (["**", "!util/docker/web"], "util/docker/web/foo", False),
        (["**", "!util/docker/web", "util/docker/web/foo"], "util/docker/web/foo", True),
        (["**", "!dist/*.whl"], "dist/proxy-1.0-py3-none-any.whl", False),
        (["docs", "!docs/README.md"], "docs/README.md", False),
        (["docs/", "!docs/README.md"], "docs/other.md", True),
        (["docs/*", "!docs/README.md"], "docs/README.md", False),
        (["*.go", "!fileutils.go"], "fileutils.go", False),
        (["!fileutils.go", "*.go"], "fileutils.go", True),
        (["*.md", "!README*.md", "README-secret.md"], "README-secret.md", True),
        (["*.md", "!README*.md", "README-secret.md"], "README.md", False),
        (["*.go"], ".", False),
    ],
)
def test_ignore_exceptions_last_match_wins(lines: list[str], path: str, excluded: bool) -> None:
    assert IgnoreRules.parse("\n".join(lines)).excluded(path) is excluded


def test_ignore_file_format() -> None:
    rules = IgnoreRules.parse(
        "\ufeff# comment\r\n"
        "  # not a comment: comments start in the first column\r\n"
        "\r\n"
        "   /secret/../tmp/   \r\n"
        "!  tmp/keep  \r\n"
        "*/temp*\n"
    )
    assert [(r.pattern, r.exception) for r in rules.rules] == [
        ("# not a comment: comments start in the first column", False),
        ("tmp", False), ("tmp/keep", True), ("*/temp*", False)]
    assert rules.has_exceptions
    assert rules.excluded("tmp/x") and not rules.excluded("tmp/keep/y")
    assert rules.excluded("a/temporary") and not rules.excluded("a/b/temporary")
    assert not IgnoreRules.parse("*.o\n").has_exceptions


@pytest.mark.parametrize(("text", "line"), [("ok\n[\n", 2), ("!\n", 1), ("a\\\n", 1)])
def test_ignore_bad_patterns(text: str, line: int) -> None:
    with pytest.raises(DockerfileError, match=rf"^ctx/.dockerignore:{line}: "):
        IgnoreRules.parse(text, "ctx/.dockerignore")


@pytest.mark.parametrize(
    ("pattern", "name", "matched"),
    [  # Go's filepath.Match tests (as in patternmatcher_test.go)
        ("abc", "abc", True), ("*", "abc", True), ("*c", "abc", True), ("a*", "a", True),
        ("a*", "abc", True), ("a*", "ab/c", False), ("a*/b", "abc/b", True),
        ("a*/b", "a/c/b", False), ("a*b*c*d*e*/f", "axbxcxdxexxx/f", True),
        ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", False), ("a*b?c*x", "abxbbxdbxebxczzx", True),
        ("a*b?c*x", "abxbbxdbxebxczzy", False), ("ab[c]", "abc", True), ("ab[b-d]", "abc", True),
        ("ab[e-g]", "abc", False), ("ab[^c]", "abc", False), ("ab[^e-g]", "abc", True),
        ("a\\*b", "a*b", True), ("a\\*b", "ab", False), ("a?b", "a☺b", True),
        ("a[^a]b", "a☺b", True), ("a???b", "a☺b", False), ("[a-ζ]*", "\u03b1", True),
        ("*[a-ζ]", "A", False), ("a?b", "a/b", False), ("a*b", "a/b", False),
        ("[\\]a]", "]", True), ("[\\-]", "-", True), ("[x\\-]", "-", True), ("[x\\-]", "z", False),
        ("[\\-x]", "x", True), ("*x", "xxx", True), ("**", "a/b", False), ("*.go", "x.go\n", False),
    ],
)
def test_go_filepath_match(pattern: str, name: str, matched: bool) -> None:
    assert match(pattern, name) is matched


@pytest.mark.parametrize(
    "pattern", ["[]a]", "[-]", "[x-]", "[-x]", "\\", "[a-b-c]", "[", "[^", "[^bc", "a[", "[z-a]"])
def test_go_filepath_match_bad_patterns(pattern: str) -> None:
    with pytest.raises(ValueError, match="syntax error in pattern"):
        match(pattern, "a")


def test_has_magic() -> None:
    assert [has_magic(p) for p in ["*.go", "a?c", "[ab]", "plain/path", "a\\*b", "a\\\\*"]] == [
        True, True, True, False, False, True]
