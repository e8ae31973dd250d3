"""Random Delta conversations against a model client: what the server believes the
client holds is what the client holds.

The model client behaves as the xDS protocol says a Delta client does: it processes
responses in the order they arrive, ACKs or NACKs each one (a NACK applies nothing),
applies resources only of names it subscribes to, forgets what it unsubscribes, and
reconnects (to a restarted control plane, say) listing what it holds in
``initial_resource_versions``. Hostile turns are mixed in: answers to nonces already
answered, or never sent. Whenever the client has answered everything, the server's
record of what the client holds must equal what the client holds, name for name and
version for version.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mesh import xds
from tests.ads.helpers import clusters_snapshot, delta
from xds_server.ads.snapshot import ResourceInterner
from xds_server.ads.stream import Outcome, StreamLimits, StreamState

C, E = xds.CLUSTER, xds.ENDPOINT
NAMES = st.sampled_from(["a", "b", "c", "d"])
CLUSTERS = st.dictionaries(st.sampled_from("abc"), st.integers(1, 3))


@dataclass
class Subscription:
    wildcard: bool
    names: set[str] = field(default_factory=set)
    held: dict[str, str] = field(default_factory=dict)

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names


class DeltaConversation(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.interner = ResourceInterner()
        self.generation = 1
        self.clusters: dict[str, int] = {"a": 1}
        # CDS by wildcard (as Envoy), EDS by name.
        self.client = {C: Subscription(wildcard=True), E: Subscription(wildcard=False)}
        self.inbox: list[discovery_pb2.DeltaDiscoveryResponse] = []
        self.answered: list[tuple[str, str]] = []
        # A small window, so that the bound on unanswered responses is exercised too.
        self.server = StreamState(delta=True, limits=StreamLimits(max_unanswered=3))
        self.server.set_snapshot(clusters_snapshot(self.interner, self.clusters))
        self._send(delta(C, node=True))
        self._send(delta(E, ["a"]))
        self.client[E].names.add("a")

    # -- the wire ------------------------------------------------------------------

    def _send(self, request: discovery_pb2.DeltaDiscoveryRequest) -> Outcome:
        outcome = self.server.on_request(request).outcome
        self._pump()
        return outcome

    def _pump(self) -> None:
        for out in self.server.responses():
            self.inbox.append(discovery_pb2.DeltaDiscoveryResponse.FromString(out.payload))

    # -- the server's side -----------------------------------------------------------

    @rule(clusters=CLUSTERS)
    def config_changes(self, clusters: dict[str, int]) -> None:
        self.generation += 1
        self.clusters = clusters
        self.server.set_snapshot(clusters_snapshot(self.interner, clusters, self.generation))
        self._pump()

    # -- the client's side -----------------------------------------------------------

    @precondition(lambda self: bool(self.inbox))
    @rule(accept=st.booleans(), resubscribe=st.lists(NAMES, max_size=2))
    def process_next(self, accept: bool, resubscribe: list[str]) -> None:
        """Process the oldest response and answer it; an ACK may carry new subscriptions,
        as Envoy's do."""
        resp = self.inbox.pop(0)
        sub = self.client[resp.type_url]
        if accept:
            for res in resp.resources:
                if sub.wants(res.name):
                    sub.held[res.name] = res.version
            for name in resp.removed_resources:
                sub.held.pop(name, None)
        extra = resubscribe if accept and resp.type_url == E else []
        sub.names.update(extra)
        outcome = self._send(
            delta(resp.type_url, extra, nonce=resp.nonce, error=None if accept else "rejected")
        )
        assert outcome is (Outcome.ACK if accept else Outcome.NACK)
        self.answered.append((resp.type_url, resp.nonce))

    @precondition(lambda self: bool(self.answered))
    @rule(index=st.integers(0, 1000), nack=st.booleans())
    def answer_again(self, index: int, nack: bool) -> None:
        """A hostile or confused client answers a response it answered already."""
        type_url, nonce = self.answered[index % len(self.answered)]
        outcome = self._send(delta(type_url, nonce=nonce, error="again" if nack else None))
        assert outcome in (Outcome.STALE, Outcome.REREQUEST)

    @rule(type_url=st.sampled_from([C, E]), nack=st.booleans())
    def answer_unknown_nonce(self, type_url: str, nack: bool) -> None:
        outcome = self._send(delta(type_url, nonce="never-sent", error="x" if nack else None))
        assert outcome is Outcome.STALE

    @rule(names=st.lists(NAMES, min_size=1, max_size=3))
    def subscribe(self, names: list[str]) -> None:
        self.client[E].names.update(names)
        self._send(delta(E, names))

    @rule(type_url=st.sampled_from([C, E]), names=st.lists(NAMES, min_size=1, max_size=3))
    def unsubscribe(self, type_url: str, names: list[str]) -> None:
        sub = self.client[type_url]
        sub.names.difference_update(names)
        for name in names:
            sub.held.pop(name, None)
        self._send(delta(type_url, unsubscribe=names))

    @rule()
    def reconnect(self) -> None:
        """The stream breaks (responses in flight are lost) and the client reconnects to
        a server that knows nothing of it, listing what it holds."""
        self.inbox.clear()
        self.answered.clear()
        self.server = StreamState(delta=True, limits=StreamLimits(max_unanswered=3))
        self.server.set_snapshot(clusters_snapshot(self.interner, self.clusters, self.generation))
        cds, eds = self.client[C], self.client[E]
        self._send(delta(C, sorted(cds.names), initial=cds.held, node=True))
        self._send(delta(E, sorted(eds.names), initial=eds.held))

    # -- the invariant ---------------------------------------------------------------

    @invariant()
    def server_knows_what_the_client_holds(self) -> None:
        if self.inbox:
            return  # responses in flight: the server cannot know yet
        for type_url, sub in self.client.items():
            state = self.server.types[type_url]
            believed = {name: res.version for name, res in state.acked.items()}
            assert believed == sub.held, f"{xds.short(type_url)}: {believed} != {sub.held}"
            assert not state.unanswered and not state.pending

    @invariant()
    def unanswered_responses_stay_bounded(self) -> None:
        for state in self.server.types.values():
            assert len(state.unanswered) <= self.server.limits.max_unanswered


DeltaConversation.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None
)
test_delta_conversations = DeltaConversation.TestCase
