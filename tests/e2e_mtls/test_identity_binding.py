"""Identity from the world (issue 11, #10), without sockets: the authorizer on each kind of
transport, and the binding of an authenticated stream to its pod, at admission and in every
later generation.

The contexts are what gRPC hands a handler: a peer string and an auth context, as
``xds_server.auth.transport.stream_peer`` reads them (their shape is checked against a real
gRPC server in test_xds_auth.py).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from types import MappingProxyType

import grpc
import pytest

from mesh.model import Workload, World
from mesh.proxy import NodeIdError, Proxy, proxy_from_node
from mtls.ca import CertificateAuthority
from mtls.identity import Identity, binding_problem, workload_identity
from mtls.tokens import TokenIdentity
from xds_server.ads.server import Refusal
from xds_server.auth.authorizer import MeshAuthorizer

TD = "cluster.local"
CHAT_0, CHAT_1, GPU_0, NODE = "10.0.0.10", "10.0.0.11", "10.0.0.1", "10.0.9.9"


def world(*extra: Workload) -> World:
    pods = [
        Workload("default", "chat-0", "chat", ip=CHAT_0),
        Workload("default", "chat-1", "chat", ip=CHAT_1),
        Workload("default", "gpu-0", "llama", ip=GPU_0),
        # Two host-network pods share their node's IP: the IP names neither.
        Workload("default", "agent-a", "agent", ip=NODE),
        Workload("default", "agent-b", "monitor", ip=NODE),
        *extra,
    ]
    return World(workloads=MappingProxyType({w.key: w for w in pods}))


class Context:
    """A servicer context as gRPC fills it for one transport."""

    def __init__(
        self,
        peer_ip: str,
        *,
        tls: bool = False,
        certificate: bytes | None = None,
        token: str = "",
    ) -> None:
        self._peer = f"ipv4:{peer_ip}:40000"
        self._auth: dict[str, list[bytes]] = {"transport_security_type": [b"insecure"]}
        if tls or certificate is not None:
            self._auth = {"transport_security_type": [b"ssl"]}
        if certificate is not None:
            self._auth["x509_pem_cert"] = [certificate]
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


TOKENS = {
    "chat-0": TokenIdentity("default", "chat", "chat-0"),
    "chat-7": TokenIdentity("default", "chat", "chat-7"),
    "unbound": TokenIdentity("default", "chat"),
}


class Tokens:
    async def review(self, token: str) -> TokenIdentity | str:
        return TOKENS.get(token, "token refused: unknown")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


def authorizer(ca: CertificateAuthority, the_world: World | None = None) -> MeshAuthorizer:
    current = the_world if the_world is not None else world()
    return MeshAuthorizer(
        ca=ca,
        world=lambda: current,
        trust_domain=TD,
        plaintext_secrets_from=(ipaddress.ip_network("10.0.0.0/24"),),
        tokens=Tokens(),
    )


def node(pod: str, ip: str, *, namespace: str = "default", account: str = "") -> Proxy:
    metadata = {"SERVICE_ACCOUNT": account} if account else {}
    return proxy_from_node(
        f"sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local", metadata
    )


async def admit(authorizer: MeshAuthorizer, proxy: Proxy, context: Context) -> Proxy | Refusal:
    return await authorizer.admit(proxy, context)


# --------------------------------------------------------------------------- plaintext


@pytest.mark.parametrize(
    ("claim", "peer", "served_as"),
    [
        ("", CHAT_0, "chat"),  # no claim: served as the pod at that IP
        ("chat", CHAT_0, "chat"),
        ("llama", CHAT_0, None),  # contradicts the pod at that IP: refused
        ("llama", "10.0.0.77", "llama"),  # nobody known there: the claim stands
        ("anything", NODE, "anything"),  # two pods share the IP: it names neither
    ],
)
async def test_plaintext_service_account_is_checked_against_the_pod_at_that_ip(
    ca: CertificateAuthority, claim: str, peer: str, served_as: str | None
) -> None:
    result = await admit(authorizer(ca), node("chat-0", CHAT_0, account=claim), Context(peer))
    if served_as is None:
        assert isinstance(result, Refusal)
        assert result.code is grpc.StatusCode.PERMISSION_DENIED
        assert "runs as default/chat" in result.message
    else:
        assert isinstance(result, Proxy)
        assert result.service_account == served_as
        assert result.identity == f"default/{served_as}"
        assert not result.authenticated_identity


async def test_plaintext_peers_outside_the_allowlist_get_no_secrets(
    ca: CertificateAuthority,
) -> None:
    inside = await admit(authorizer(ca), node("chat-0", CHAT_0), Context(CHAT_0))
    outside = await admit(authorizer(ca), node("chat-0", CHAT_0), Context("192.168.1.5"))
    assert isinstance(inside, Proxy) and inside.secrets_allowed
    assert isinstance(outside, Proxy) and not outside.secrets_allowed
    assert outside.peer_ip == "192.168.1.5"


# --------------------------------------------------------------------------- tokens


@pytest.mark.parametrize(
    ("proxy", "token", "expected"),
    [
        (node("chat-0", CHAT_0), "chat-0", "default/chat"),
        (node("chat-0", CHAT_0, account="chat"), "chat-0", "default/chat"),
        # A pod the world does not know yet: admitted, with no identity until it is known.
        (node("chat-7", "10.0.0.17"), "chat-7", "default/chat"),
        # A bound token speaks for its own pod only, not a sibling of its account.
        (node("chat-1", CHAT_1), "chat-0", grpc.StatusCode.PERMISSION_DENIED),
        (node("gpu-0", GPU_0), "unbound", grpc.StatusCode.PERMISSION_DENIED),
        (node("chat-0", CHAT_0, namespace="prod"), "chat-0", grpc.StatusCode.PERMISSION_DENIED),
        # Metadata that contradicts the proof is refused, not overridden.
        (node("chat-0", CHAT_0, account="llama"), "chat-0", grpc.StatusCode.PERMISSION_DENIED),
        # The node ID's IP must be the pod's.
        (node("chat-0", GPU_0), "chat-0", grpc.StatusCode.PERMISSION_DENIED),
        (node("chat-0", CHAT_0), "forged", grpc.StatusCode.UNAUTHENTICATED),
        (node("chat-0", CHAT_0), "", grpc.StatusCode.UNAUTHENTICATED),
    ],
    ids=[
        "own-pod",
        "own-pod-claiming-its-account",
        "pod-not-yet-known",
        "sibling-pod",
        "pod-of-another-account",
        "other-namespace",
        "contradicting-metadata",
        "node-id-ip-of-another-pod",
        "bad-token",
        "no-token",
    ],
)
async def test_token_streams_are_bound_to_their_pod(
    ca: CertificateAuthority, proxy: Proxy, token: str, expected: str | grpc.StatusCode
) -> None:
    # Tokens travel over server TLS; the peer address does not matter to a bound token.
    result = await admit(authorizer(ca), proxy, Context("10.9.9.9", tls=True, token=token))
    if isinstance(expected, str):
        assert isinstance(result, Proxy), result
        assert result.authenticated_identity == expected
        assert result.service_account == "chat"
        assert result.authenticated_pod == TOKENS[token].pod_name
    else:
        assert isinstance(result, Refusal) and result.code is expected, result


@pytest.mark.parametrize(("peer", "allowed"), [(CHAT_0, True), (CHAT_1, False)])
async def test_an_unbound_token_binds_by_address_as_a_certificate_does(
    ca: CertificateAuthority, peer: str, allowed: bool
) -> None:
    result = await admit(
        authorizer(ca), node("chat-0", CHAT_0), Context(peer, tls=True, token="unbound")
    )
    assert isinstance(result, Proxy) is allowed, result


# --------------------------------------------------------------------------- certificates


@pytest.mark.parametrize(
    ("proxy", "peer", "allowed"),
    [
        (node("chat-0", CHAT_0), CHAT_0, True),
        (node("chat-1", CHAT_1), CHAT_1, True),
        # A certificate names only the account: chat-0 cannot pass for its sibling chat-1.
        (node("chat-1", CHAT_1), CHAT_0, False),
        # ... nor by naming its own IP in the node ID.
        (node("chat-1", CHAT_0), CHAT_0, False),
        (node("gpu-0", GPU_0), GPU_0, False),
        (node("chat-9", "10.0.0.19"), "10.0.0.19", True),  # not known yet
    ],
    ids=["chat-0", "chat-1", "sibling", "sibling-with-own-ip", "other-account", "unknown-pod"],
)
async def test_certificate_streams_are_bound_to_the_pod_at_their_address(
    ca: CertificateAuthority, proxy: Proxy, peer: str, allowed: bool
) -> None:
    chat = ca.issue_workload(TD, "default", "chat").cert_pem
    result = await admit(authorizer(ca), proxy, Context(peer, certificate=chat))
    if allowed:
        assert isinstance(result, Proxy), result
        assert (result.authenticated_identity, result.peer_ip) == ("default/chat", peer)
        assert result.authenticated_pod == ""
    else:
        assert isinstance(result, Refusal) and result.code is grpc.StatusCode.PERMISSION_DENIED


async def test_certificates_of_another_trust_domain_are_refused(
    ca: CertificateAuthority,
) -> None:
    elsewhere = ca.issue_workload("other.td", "default", "chat").cert_pem
    result = await admit(
        authorizer(ca), node("chat-0", CHAT_0), Context(CHAT_0, certificate=elsewhere)
    )
    assert isinstance(result, Refusal) and result.code is grpc.StatusCode.UNAUTHENTICATED
    assert "other.td" in result.message


# --------------------------------------------------------------------------- later generations


async def test_a_claim_the_world_contradicts_later_loses_its_identity(
    ca: CertificateAuthority,
) -> None:
    """A stream admitted for a pod the world did not know yet keeps no identity once the
    pod appears elsewhere: its secrets and its place as that pod's sidecar go."""
    chat = ca.issue_workload(TD, "default", "chat").cert_pem
    early = await admit(
        authorizer(ca), node("chat-9", "10.0.0.19"), Context("10.0.0.19", certificate=chat)
    )
    assert isinstance(early, Proxy)
    assert workload_identity(world(), early) is None  # unknown pod: no identity yet
    honest = world(Workload("default", "chat-9", "chat", ip="10.0.0.19"))
    assert workload_identity(honest, early) == Identity("default", "chat")
    elsewhere = world(Workload("default", "chat-9", "chat", ip="10.0.0.29"))
    assert binding_problem(elsewhere, early) is not None
    assert workload_identity(elsewhere, early) is None
    runs_as_other = world(Workload("default", "chat-9", "llama", ip="10.0.0.19"))
    assert workload_identity(runs_as_other, early) is None


def test_unauthenticated_proxies_have_no_binding_problem() -> None:
    claimed = node("gpu-0", "10.0.0.99", account="chat")
    assert binding_problem(world(), claimed) is None
    assert binding_problem(world(), dataclasses.replace(claimed, peer_ip="1.2.3.4")) is None


@pytest.mark.parametrize("address", ["10.0.0.5", "0.0.0.0", "localhost", "::2"])
def test_workload_address_must_be_loopback(address: str) -> None:
    with pytest.raises(NodeIdError, match="INFERLANE_WORKLOAD_ADDRESS"):
        proxy_from_node(
            "sidecar~10.0.0.1~a.default~default.svc.cluster.local",
            {"INFERLANE_WORKLOAD_ADDRESS": address},
        )
    for loopback in ("127.0.0.1", "127.0.53.1", "::1"):
        parsed = proxy_from_node(
            "sidecar~10.0.0.1~a.default~default.svc.cluster.local",
            {"INFERLANE_WORKLOAD_ADDRESS": loopback},
        )
        assert parsed.workload_address == loopback
