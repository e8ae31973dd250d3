"""The world as the control plane sees it: a frozen model, built fresh per change.

Sources (manifest files, the Kubernetes API) turn raw objects into a :class:`World`.
Translators (``routing``, ``mtls``, ``ratelimit``) read it without locks: nothing in
here is ever mutated after construction, so one ``World`` is shared by every proxy's
config generation for one push.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

CLUSTER_DOMAIN = "cluster.local"


class Priority(enum.StrEnum):
    """The three request classes, highest first."""

    CRITICAL = "critical"
    STANDARD = "standard"
    SHEDDABLE = "sheddable"


#: Highest first; the order routes and clusters are emitted in.
PRIORITIES: tuple[Priority, ...] = (Priority.CRITICAL, Priority.STANDARD, Priority.SHEDDABLE)

#: The request header that names a request's class (value case-insensitive).
PRIORITY_HEADER = "x-inference-priority"

#: The name of the Envoy sidecar container ``inferlane inject`` adds to a Pod.
SIDECAR_CONTAINER = "inferlane-proxy"

#: The response header that says why inferlane's config refused a request (SPEC
#: "Refusals"); its values are the :class:`Refusal` reasons.
REFUSED_HEADER = "x-inferlane-refused"


class Refusal(enum.StrEnum):
    """Why inferlane's config refused a request: the values of :data:`REFUSED_HEADER`."""

    #: A class over its ``rate-limit`` at an endpoint (429).
    RATE_LIMIT = "rate-limit"
    #: A caller over its ``global-rate-limit`` (429).
    GLOBAL_RATE_LIMIT = "global-rate-limit"
    #: A caller whose request does not fit in what is left of its ``token-budget`` (429).
    TOKEN_BUDGET = "token-budget"
    #: A class over its concurrency share at an endpoint, and no other could take it (503).
    CONCURRENCY = "concurrency"
    #: ``critical`` from a caller not on ``critical-callers`` (403).
    CRITICAL_CALLER = "critical-caller"


#: The share of an endpoint's ``max-concurrency`` each class may hold at once, for the
#: classes the Service gives no cap of their own. Lower classes leave room for critical:
#: standard may hold three quarters, so a quarter stays free for critical even when
#: standard saturates; sheddable half, so it is throttled first and can never crowd
#: standard out on its own. Critical has no share: it is never capped unless the Service
#: names a cap for it. The one table every layer reads (routing's admission clusters, the
#: adaptive controller's limits).
CLASS_SHARES: Mapping[Priority, float] = MappingProxyType(
    {Priority.STANDARD: 0.75, Priority.SHEDDABLE: 0.5}
)


class MtlsMode(enum.StrEnum):
    STRICT = "strict"
    PERMISSIVE = "permissive"


class SchedulingPolicy(enum.StrEnum):
    """How the model server orders its queue (vLLM's ``--scheduling-policy``)."""

    #: First come, first served: vLLM's default. The class is not passed on.
    FCFS = "fcfs"
    #: By the request body's ``priority`` (lower first, with preemption): the endpoint's
    #: sidecar writes each request's class into the body.
    PRIORITY = "priority"


def _frozen(mapping: Mapping[Priority, float] | None = None) -> Mapping[Priority, float]:
    return MappingProxyType(dict(mapping or {}))


def _frozen_counts() -> Mapping[Priority, int]:
    return MappingProxyType({})


#: Default per-class request timeout, in seconds (SPEC: 300 s for every class).
DEFAULT_TIMEOUT_S = 300.0

#: What a request that names no ``max_tokens`` reserves for its completion, unless the
#: Service sets ``default-max-tokens``: a long answer, not the model's whole context.
RESERVED_MAX_TOKENS = 4096


class BudgetTier(enum.StrEnum):
    """Which requests a token budget charges."""

    #: ``standard`` and ``sheddable`` requests: entries written ``CALLER=TOKENS/WINDOW``.
    STANDARD = "standard"
    #: ``critical`` requests, charged only by entries written ``critical:CALLER=...``.
    CRITICAL = "critical"

    @classmethod
    def of(cls, priority: Priority) -> BudgetTier:
        return cls.CRITICAL if priority is Priority.CRITICAL else cls.STANDARD


@dataclass(frozen=True)
class TokenBudget:
    """One entry of ``inferlane.io/token-budget``: LLM tokens per window for a caller."""

    #: ``NAMESPACE/SERVICEACCOUNT``, ``NAMESPACE/*`` or ``*`` (every caller no other entry
    #: of the same tier names). With a wildcard, each caller gets a budget of its own.
    caller: str
    tokens: int
    #: The window's length in seconds: 1, 60 or 3600.
    window_s: int
    tier: BudgetTier = BudgetTier.STANDARD

    def specificity(self, caller: str) -> int | None:
        """How closely this entry names ``caller`` (``NS/SA``): 2 exactly, 1 by its
        namespace, 0 as ``*``; None when it does not name it."""
        if self.caller == caller:
            return 2
        if self.caller.endswith("/*") and caller.startswith(self.caller[:-1]):
            return 1
        return 0 if self.caller == "*" else None

    @property
    def name(self) -> str:
        """The entry as written in the annotation, without its size: ``default/chat`` or
        ``critical:*``. Metrics and debug pages name budgets by it."""
        prefix = "critical:" if self.tier is BudgetTier.CRITICAL else ""
        return prefix + self.caller


@dataclass(frozen=True, eq=True)
class AnnotationError:
    """One bad annotation value. The Service is served with that annotation at its default."""

    annotation: str
    value: str
    message: str

    def __str__(self) -> str:
        return f"{self.annotation}={self.value!r}: {self.message}"


@dataclass(frozen=True)
class ServiceConfig:
    """A Service's parsed ``inferlane.io/*`` annotations (defaults where absent or bad)."""

    enabled: bool = False
    default_priority: Priority = Priority.STANDARD
    #: Normalised entries: ``ns/sa``, ``ns/*`` or ``spiffe://...``. Empty means no clamp.
    critical_callers: tuple[str, ...] = ()
    #: Requests per second each backend endpoint admits, per class.
    rate_limit: Mapping[Priority, float] = field(default_factory=_frozen)
    #: Requests one endpoint serves at once (vLLM's ``max_num_seqs``), or None.
    max_concurrency: int | None = None
    #: Per-class caps the Service names itself (``max-concurrency: "64,sheddable=8"``);
    #: they replace that class's share of ``max_concurrency``.
    class_concurrency: Mapping[Priority, int] = field(default_factory=_frozen_counts)
    adaptive: bool = False
    #: Requests per second per calling identity and class, across all endpoints.
    global_rate_limit: Mapping[Priority, float] = field(default_factory=_frozen)
    mtls: MtlsMode = MtlsMode.PERMISSIVE
    #: Per-class request timeouts in seconds; classes not named get DEFAULT_TIMEOUT_S.
    timeouts: Mapping[Priority, float] = field(default_factory=_frozen)
    #: How the model servers order their queue; ``priority`` passes the class on.
    scheduling: SchedulingPolicy = SchedulingPolicy.FCFS
    #: LLM tokens per calling identity per window (``inferlane.io/token-budget``).
    token_budgets: tuple[TokenBudget, ...] = ()
    #: Completion tokens a request that names no ``max_tokens`` reserves.
    default_max_tokens: int = RESERVED_MAX_TOKENS

    def timeout_for(self, priority: Priority) -> float:
        return self.timeouts.get(priority, DEFAULT_TIMEOUT_S)

    def concurrency_for(self, priority: Priority) -> float | None:
        """Requests of ``priority`` one endpoint serves at once, before any adaptive
        multiplier and rounding: the Service's own cap for the class, else the class's
        share of ``max_concurrency``. None: the class is not capped."""
        own = self.class_concurrency.get(priority)
        if own is not None:
            return float(own)
        share = CLASS_SHARES.get(priority)
        if share is None or self.max_concurrency is None:
            return None
        return share * self.max_concurrency

    @property
    def caps_concurrency(self) -> bool:
        """Whether any class of this Service has a concurrency cap."""
        return self.max_concurrency is not None or bool(self.class_concurrency)

    @property
    def counted_per_caller(self) -> bool:
        """Whether the global rate-limit service counts this Service's calls per caller: it
        has a global rate limit or a token budget, so each caller's routes differ."""
        return bool(self.global_rate_limit or self.token_budgets)

    def token_budget_for(self, priority: Priority, caller: str) -> TokenBudget | None:
        """The budget a request of ``priority`` from ``caller`` (``NS/SA``) draws from: the
        entry of its tier that names the caller most closely, or None (not charged)."""
        tier = BudgetTier.of(priority)
        best: tuple[int, TokenBudget] | None = None
        for budget in self.token_budgets:
            rank = budget.specificity(caller) if budget.tier is tier else None
            if rank is not None and (best is None or rank > best[0]):
                best = (rank, budget)
        return best[1] if best is not None else None


@dataclass(frozen=True)
class ServicePort:
    port: int
    name: str = ""
    #: The container port (a number) or a named port resolved per pod.
    target_port: int | str = 0
    protocol: str = "TCP"
    app_protocol: str = ""


@dataclass(frozen=True)
class Endpoint:
    """One backend address of a Service port."""

    address: str
    #: The port on the pod (the Service port's resolved target port).
    port: int
    #: The Service port this endpoint serves.
    service_port: int
    ready: bool = True
    #: GPU-backed per SPEC: the pod requests a GPU, or its node has nvidia.com/gpu.present.
    gpu: bool = False
    pod_namespace: str = ""
    pod_name: str = ""
    node_name: str = ""

    @property
    def pod_key(self) -> tuple[str, str] | None:
        return (self.pod_namespace, self.pod_name) if self.pod_name else None


@dataclass(frozen=True)
class InferenceService:
    """A Kubernetes Service that opted in with ``inferlane.io/enabled: "true"``."""

    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    config: ServiceConfig
    errors: tuple[AnnotationError, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    uid: str = ""

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.{CLUSTER_DOMAIN}"

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def endpoints_for(self, port: int) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.endpoints if e.service_port == port)


@dataclass(frozen=True)
class Workload:
    """A Pod, with the identity its sidecar gets."""

    namespace: str
    name: str
    service_account: str = "default"
    ip: str = ""
    node_name: str = ""
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    gpu: bool = False
    ready: bool = False
    #: The Pod runs inferlane's sidecar (a container or native sidecar named
    #: :data:`SIDECAR_CONTAINER`). Whether it is *connected* is the control plane's to know.
    sidecar: bool = False
    #: The sequences one model server in the Pod runs at once, where its arguments say so
    #: (vLLM's ``--max-num-seqs``); None when no container says.
    max_num_seqs: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class SourceError:
    """A problem with an input that is not one Service's annotation (a broken file, say)."""

    source: str
    message: str
    #: Something that works but probably not as meant (annotations that have no effect),
    #: rather than an input that could not be used.
    warning: bool = False


@dataclass(frozen=True)
class World:
    """Everything the translators may read. Build a new one per change; never mutate."""

    services: tuple[InferenceService, ...] = ()
    workloads: Mapping[tuple[str, str], Workload] = field(
        default_factory=lambda: MappingProxyType({})
    )
    #: Problems with the inputs as a whole; the last good state of that input is kept.
    source_errors: tuple[SourceError, ...] = ()

    def service(self, namespace: str, name: str) -> InferenceService | None:
        for svc in self.services:
            if svc.namespace == namespace and svc.name == name:
                return svc
        return None

    def workload(self, namespace: str, name: str) -> Workload | None:
        return self.workloads.get((namespace, name))

    def workloads_at(self, ip: str) -> tuple[Workload, ...]:
        """The pods whose IP is ``ip``: several when they share their node's network."""
        return self._workloads_by_ip.get(ip, ())

    @functools.cached_property
    def _workloads_by_ip(self) -> Mapping[str, tuple[Workload, ...]]:
        found: dict[str, list[Workload]] = {}
        for workload in self.workloads.values():
            if workload.ip:
                found.setdefault(workload.ip, []).append(workload)
        return {ip: tuple(pods) for ip, pods in found.items()}

    def endpoints_of(
        self, pod_key: tuple[str, str] | None, ip: str | None = None
    ) -> tuple[Owned, ...]:
        """The endpoints on one pod, with their Services and their place in the Service's
        list: those naming the pod, and (given its ``ip``) those there that name no pod."""
        named = self._endpoints_by_pod.get(pod_key, ()) if pod_key is not None else ()
        if ip is None:
            return named
        return named + self._endpoints_by_address.get(ip, ())

    @functools.cached_property
    def _endpoints_by_pod(self) -> Mapping[tuple[str, str], tuple[Owned, ...]]:
        found: dict[tuple[str, str], list[Owned]] = {}
        for svc in self.services:
            for index, endpoint in enumerate(svc.endpoints):
                if endpoint.pod_key is not None:
                    found.setdefault(endpoint.pod_key, []).append((svc, index, endpoint))
        return {key: tuple(owned) for key, owned in found.items()}

    @functools.cached_property
    def _endpoints_by_address(self) -> Mapping[str, tuple[Owned, ...]]:
        found: dict[str, list[Owned]] = {}
        for svc in self.services:
            for index, endpoint in enumerate(svc.endpoints):
                if endpoint.pod_key is None:
                    found.setdefault(endpoint.address, []).append((svc, index, endpoint))
        return {ip: tuple(owned) for ip, owned in found.items()}


#: An endpoint with its Service and its index in the Service's endpoints.
Owned = tuple[InferenceService, int, Endpoint]
