from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.model import Priority
from routing import clamp
from tests.routing.factories import config, gateway, proxy


@pytest.mark.parametrize(
    ("entry", "identity"),
    [
        ("prod/api", ("prod", "api")),
        (" prod/api ", ("prod", "api")),
        ("prod/*", ("prod", "*")),
        ("spiffe://cluster.local/ns/prod/sa/api", ("prod", "api")),
        ("spiffe://example.org/ns/prod/sa/api", ("prod", "api")),
        ("spiffe://cluster.local/ns/prod/sa/", None),
        ("spiffe://cluster.local/ns/prod", None),
        ("spiffe:///ns/prod/sa/api", None),
        ("spiffe://td/namespace/prod/serviceaccount/api", None),
        ("prod", None),
        ("prod/", None),
        ("/api", None),
        ("prod/api/extra", None),
        ("", None),
    ],
)
def test_entry_identity(entry: str, identity: tuple[str, str] | None) -> None:
    assert clamp.entry_identity(entry) == identity


@pytest.mark.parametrize(
    ("entry", "namespace", "account", "matches"),
    [
        ("prod/api", "prod", "api", True),
        ("prod/api", "prod", "web", False),
        ("prod/api", "dev", "api", False),
        ("prod/*", "prod", "anything", True),
        ("prod/*", "dev", "anything", False),
        ("spiffe://cluster.local/ns/prod/sa/api", "prod", "api", True),
        ("spiffe://other.domain/ns/prod/sa/api", "prod", "api", True),
        ("spiffe://cluster.local/ns/prod/sa/api", "prod", "web", False),
        ("garbage", "prod", "api", False),
    ],
)
def test_caller_matches(entry: str, namespace: str, account: str, matches: bool) -> None:
    assert clamp.caller_matches(entry, namespace, account) is matches


@given(st.text(), st.text(), st.text())
def test_caller_matches_never_raises(entry: str, namespace: str, account: str) -> None:
    clamp.caller_matches(entry, namespace, account)


def test_no_list_means_no_clamp() -> None:
    caller = proxy(namespace="anywhere", service_account="anyone")
    assert clamp.effective_class(Priority.CRITICAL, config(), caller) is Priority.CRITICAL


@pytest.mark.parametrize("requested", list(Priority))
def test_unlisted_caller_loses_critical_only(requested: Priority) -> None:
    cfg = config(callers=["prod/api"])
    caller = proxy(namespace="dev", service_account="api")
    expected = Priority.STANDARD if requested is Priority.CRITICAL else requested
    assert clamp.effective_class(requested, cfg, caller) is expected


def test_listed_caller_keeps_critical() -> None:
    cfg = config(callers=["dev/web", "prod/api"])
    caller = proxy(namespace="prod", service_account="api")
    assert clamp.effective_class(Priority.CRITICAL, cfg, caller) is Priority.CRITICAL


def test_gateways_are_clamped_by_their_own_identity() -> None:
    cfg = config(callers=["prod/api"])
    assert not clamp.may_request_critical(cfg, gateway(namespace="ingress"))
    listed = config(callers=["ingress/gateway"])
    assert clamp.may_request_critical(listed, gateway(namespace="ingress"))
