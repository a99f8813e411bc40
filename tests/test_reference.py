"""Image references: Docker's grammar and normalization (cases from distribution/reference)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from layerfs.errors import ReferenceError_
from layerfs.reference import Reference, api_host, parse

HEX = "0123456789abcdef" * 4
DIGEST = f"sha256:{HEX}"


@pytest.mark.parametrize(
    ("text", "full", "familiar"),
    [
        ("ubuntu", "docker.io/library/ubuntu:latest", "ubuntu"),
        ("ubuntu:22.04", "docker.io/library/ubuntu:22.04", "ubuntu"),
        ("library/debian", "docker.io/library/debian:latest", "debian"),
        ("jpetazzo/clock", "docker.io/jpetazzo/clock:latest", "jpetazzo/clock"),
        ("docker.io/debian", "docker.io/library/debian:latest", "debian"),
        ("docker.io/library/debian", "docker.io/library/debian:latest", "debian"),
        ("index.docker.io/docker/docker", "docker.io/docker/docker:latest", "docker/docker"),
        ("index.docker.io/debian:12", "docker.io/library/debian:12", "debian"),
        ("docker.io/library/foo/bar", "docker.io/library/foo/bar:latest", "library/foo/bar"),
        ("localhost/foo", "localhost/foo:latest", "localhost/foo"),
        ("localhost:5000/wordpress", "localhost:5000/wordpress:latest", "localhost:5000/wordpress"),
        (
            "registry.example.com:5000/my-private/image",
            "registry.example.com:5000/my-private/image:latest",
            "registry.example.com:5000/my-private/image",
        ),
        ("127.0.0.1:5000/library/debian", "127.0.0.1:5000/library/debian:latest", None),
        ("[fc00::1]:5000/docker/docker", "[fc00::1]:5000/docker/docker:latest", None),
        ("[fc00:1:2:3:4:5:6:7]:5000/x", "[fc00:1:2:3:4:5:6:7]:5000/x:latest", None),
        ("Foo/bar", "Foo/bar:latest", "Foo/bar"),  # an uppercase first element is a domain
        ("192.168.0.1", "docker.io/library/192.168.0.1:latest", "192.168.0.1"),
        ("192.168.0.1:80", "docker.io/library/192.168.0.1:80", "192.168.0.1"),
        ("localhost:5000", "docker.io/library/localhost:5000", "localhost"),  # tag 5000
        ("xn--n3h.com/myimage:xn--n3h.com", "xn--n3h.com/myimage:xn--n3h.com", None),
        ("lowercase:Uppercase", "docker.io/library/lowercase:Uppercase", None),
        ("a_b/c__d/e-f/g---h/i.j", "docker.io/a_b/c__d/e-f/g---h/i.j:latest", None),
        (f"ubuntu@{DIGEST}", f"docker.io/library/ubuntu@{DIGEST}", "ubuntu"),
        (f"ubuntu:22.04@{DIGEST}", f"docker.io/library/ubuntu:22.04@{DIGEST}", "ubuntu"),
        (f"localhost:5000/a/b@{DIGEST}", f"localhost:5000/a/b@{DIGEST}", "localhost:5000/a/b"),
    ],
)
def test_valid(text: str, full: str, familiar: str | None) -> None:
    ref = Reference.parse(text)
    assert str(ref) == full
    if familiar is not None:
        assert ref.familiar() == familiar
    assert Reference.parse(full) == ref


def test_fields() -> None:
    ref = parse(f"localhost:5000/a/b:v1@{DIGEST}")
    assert (ref.domain, ref.path, ref.tag, ref.digest) == ("localhost:5000", "a/b", "v1", DIGEST)
    assert ref.name == "localhost:5000/a/b"
    assert parse(f"busybox@{DIGEST}").tag is None
    assert parse("busybox").tag == "latest"
    assert parse("busybox").digest is None


def test_api_host() -> None:
    assert api_host("docker.io") == "registry-1.docker.io"
    assert parse("ubuntu").api_host() == "registry-1.docker.io"
    assert parse("index.docker.io/library/ubuntu").api_host() == "registry-1.docker.io"
    assert parse("localhost:5000/x").api_host() == "localhost:5000"
    assert parse("quay.io/x/y").api_host() == "quay.io"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("UPPER", "UPPER: repository name must be lowercase"),
        ("docker/Docker", "repository name must be lowercase"),
        ("docker.io/docker/Docker", "repository name must be lowercase"),
        ("test:5000/Uppercase/lowercase:tag", "repository name must be lowercase"),
        ("Foo/FarB", "repository name must be lowercase"),
        ("", "repository name must have at least one component"),
        (":latest", "repository name must have at least one component"),
        (HEX, "image id"),
        ("https://github.com/docker/docker", "invalid registry domain"),
        ("-docker", "invalid repository name component '-docker'"),
        ("-docker/docker", "invalid repository name component"),
        ("-docker.io/docker/docker", "invalid registry domain"),
        ("docker///docker", "invalid repository name component ''"),
        ("docker.io/docker///docker", "invalid repository name component ''"),
        ("a/", "invalid repository name component ''"),
        ("/a", "invalid repository name component ''"),
        ("a..b", "invalid repository name component"),
        ("a___b", "invalid repository name component"),
        ("foo_bar.com:8080/app", "invalid registry domain"),
        ("[fc00::1]", "invalid tag"),
        ("[fc00::1]:5000", "invalid repository name component"),
        ("fc00::1:5000/debian", "invalid registry domain"),
        ("[fe80::1%eth0]:5000/debian", "invalid registry domain"),
        ("[2001:db8:3:4::192.0.2.33]:5000/debian", "invalid registry domain"),
        ("ubuntu:", "invalid tag ''"),
        ("ubuntu:-x", "invalid tag '-x'"),
        ("ubuntu:" + "a" * 129, "invalid tag"),
        ("ubuntu@", "invalid digest ''"),
        ("ubuntu@sha256:abc", "invalid digest"),
        (f"ubuntu@sha256:{HEX.upper()}", "invalid digest"),
        (f"ubuntu@sha512:{HEX}{HEX}", "invalid digest"),
        (f"ubuntu@{DIGEST}@{DIGEST}", "invalid digest"),
        ("a b", "invalid repository name component"),
        ("a/" * 127 + "aa", "must not be more than 255 characters"),
    ],
)
def test_invalid(text: str, why: str) -> None:
    with pytest.raises(ReferenceError_) as info:
        Reference.parse(text)
    assert why in str(info.value)
    assert str(info.value).startswith(f"{text}: " if text else "'': ")


def test_name_length_limit_counts_the_domain() -> None:
    path = "a" * (255 - len("docker.io/"))
    assert parse(f"x/{path[2:]}").path == f"x/{path[2:]}"
    with pytest.raises(ReferenceError_, match="255"):
        parse(f"x/{path[1:]}")


alnum = st.text(alphabet="abz059", min_size=1, max_size=4)
separators = st.sampled_from([".", "_", "__", "-", "---"])
components = st.builds(
    lambda first, rest: first + "".join(sep + word for sep, word in rest),
    alnum,
    st.lists(st.tuples(separators, alnum), max_size=2),
)
paths = st.lists(components, min_size=1, max_size=4).map("/".join)
domains = st.sampled_from(["", "docker.io/", "index.docker.io/", "localhost/", "reg.io:5000/"])
tags = st.one_of(
    st.none(),
    st.builds(
        str.__add__,
        st.sampled_from("aZ9_"),
        st.text(alphabet="aZ9_.-", max_size=20),
    ),
)


@given(domain=domains, path=paths, tag=tags, pinned=st.booleans())
def test_normal_form_is_a_fixed_point(
    domain: str, path: str, tag: str | None, pinned: bool
) -> None:
    text = domain + path + (f":{tag}" if tag else "") + (f"@{DIGEST}" if pinned else "")
    # A first element with a dot is a domain, and a domain may not have "_" in it.
    assume(len(text) <= 200 and (domain or "." not in path.split("/")[0] or "/" not in path))
    ref = parse(text)
    assert parse(str(ref)) == ref
    first = ref.familiar().split("/")[0]
    if ref.domain != "docker.io" or ("." not in first and first != "localhost"):
        # (Docker's familiar form of docker.io/a.b/c reads back as the domain a.b: not here.)
        assert parse(ref.familiar()).name == ref.name
    assert ref.tag == (tag or (None if pinned else "latest"))
