from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtls.ca import BadIdentity, SpiffeId, parse_spiffe_id, spiffe_id

_label = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
_trust_domain = st.from_regex(r"[a-z0-9._-]{1,40}", fullmatch=True)
_service_account = st.lists(_label, min_size=1, max_size=3).map(".".join)


def test_format_and_parse() -> None:
    uri = spiffe_id("cluster.local", "default", "llama")
    assert uri == "spiffe://cluster.local/ns/default/sa/llama"
    parsed = parse_spiffe_id(uri)
    assert parsed == ("cluster.local", "default", "llama")
    td, ns, sa = parsed
    assert (td, ns, sa) == (parsed.trust_domain, parsed.namespace, parsed.service_account)
    assert str(parsed) == parsed.uri == uri


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "must start with 'spiffe://'"),
        ("SPIFFE://cluster.local/ns/a/sa/b", "must start with 'spiffe://'"),
        ("spiffe://cluster.local", "no path"),
        ("spiffe://cluster.local/", "path must be"),
        ("spiffe://cluster.local/ns/a/sa/b/extra", "path must be"),
        ("spiffe://cluster.local/ns/a/sb/b", "path must be"),
        ("spiffe://cluster.local/ns//sa/b", "namespace"),
        ("spiffe://cluster.local/ns/a/sa/", "service account"),
        ("spiffe://Cluster.Local/ns/a/sa/b", "trust domain"),
        ("spiffe://cluster.local:8443/ns/a/sa/b", "trust domain"),
        ("spiffe://user@cluster.local/ns/a/sa/b", "trust domain"),
        ("spiffe:///ns/a/sa/b", "trust domain"),
        ("spiffe://cluster.local/ns/A/sa/b", "namespace"),
        ("spiffe://cluster.local/ns/a/sa/b?x=1", "service account"),
        ("spiffe://cluster.local/ns/a/sa/b#frag", "service account"),
        ("spiffe://cluster.local/ns/a/sa/..", "service account"),
        ("spiffe://cluster.local/ns/" + "a" * 64 + "/sa/b", "namespace"),
        ("spiffe://td/ns/a/sa/" + "b" * 2100, "over 2048"),
    ],
)
def test_parse_is_strict_and_says_why(value: str, message: str) -> None:
    with pytest.raises(BadIdentity, match=message):
        parse_spiffe_id(value)


def test_parse_refuses_non_strings() -> None:
    with pytest.raises(BadIdentity, match="must be a string"):
        parse_spiffe_id(b"spiffe://td/ns/a/sa/b")


@given(_trust_domain, _label, _service_account)
def test_round_trip(td: str, ns: str, sa: str) -> None:
    assert parse_spiffe_id(spiffe_id(td, ns, sa)) == SpiffeId(td, ns, sa)


@given(st.text())
def test_arbitrary_text_parses_or_is_bad_identity(value: str) -> None:
    try:
        parsed = parse_spiffe_id(value)
    except BadIdentity:
        return
    assert parsed.uri == value


@given(
    st.from_regex(r"spiffe://[a-zA-Z0-9.:@_-]{0,12}(/[a-zA-Z0-9.%?#_-]{0,6}){0,6}", fullmatch=True)
)
def test_near_misses_parse_or_are_bad_identity(value: str) -> None:
    try:
        parsed = parse_spiffe_id(value)
    except BadIdentity:
        return
    assert parsed.uri == value
