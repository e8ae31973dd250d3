"""Rate limits in the running control plane: the global service and the adaptive loop.

:class:`RateLimitRuntime` owns three things, each started and stopped by the control plane:

- **The global rate-limit service** (``xds_server.rls.service``) on ``--rls-port``. Its rules are
  replaced on every new world (:meth:`RateLimitRuntime.set_world`). Counters live in this
  process, or in Redis with ``--redis URL`` so that replicas share them; when Redis cannot
  be reached, ``--rate-limit-failure-mode`` decides (``open`` admits, ``closed`` refuses),
  and the metrics say so: ``inferlane_ratelimit_backend_up{backend="redis"}`` drops to 0,
  ``inferlane_ratelimit_redis_errors_total`` and
  ``inferlane_ratelimit_failure_mode_decisions_total{mode}`` count, and
  ``inferlane_ratelimit_failure_mode{mode}`` shows the configured mode.
- **The adaptive loop.** Every ``scrape_interval_s`` it scrapes ``/metrics`` of each
  ready endpoint of every adaptive Service that has a ``rate-limit`` (aiohttp, at most
  ``scrape_concurrency`` at once, each bounded by ``scrape_timeout_s``; an endpoint
  whose scrapes keep failing is scraped less and less often, down to once every
  ``scrape_backoff_rounds + 1`` rounds, until it answers), and feeds the
  samples to the :class:`~ratelimit.adaptive.AdaptiveController`. When a step changes an
  endpoint's multipliers it calls ``on_change`` (the control plane's debouncer), and the
  next generation reads the new multipliers through :meth:`RateLimitRuntime.options`.
  Only that endpoint's sidecar reads them, so only its config changes. The controller's
  change budget bounds the pushes per endpoint; the debouncer folds simultaneous changes
  of several endpoints into one generation.
- **``/debug/ratelimits``**: the rules, the counter store's state, each token budget's
  current window per caller as this replica saw it (:class:`~ratelimit.budgets.BudgetLedger`),
  the controller's per-endpoint state with its reasons, and each adaptive endpoint's
  current rates.

Everything runs on the control plane's event loop; the controller is not thread-safe and
is only touched from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mesh.model import PRIORITIES, Endpoint, InferenceService, World
from mtls.identity import DEFAULT_TRUST_DOMAIN
from ratelimit.adaptive import (
    AdaptiveController,
    AdaptiveMetrics,
    AdaptiveSettings,
    SaturationSample,
    class_limits,
)
from ratelimit.counters import (
    Counters,
    FailureMode,
    InMemoryCounters,
    RateLimitMetrics,
    RedisCounters,
)
from ratelimit.local import DEFAULT_RLS_TIMEOUT_S
from ratelimit.rules import rules_from_world
from ratelimit.scrape import VLLM, Backoff, MetricNames, ScrapeError, Scraper
from ratelimit.tokens import TokenBudgetMode
from routing.catalog import served_ports, served_services
from routing.endpoints import FULL_WEIGHT, endpoint_key, queue_weight
from routing.limits import (
    Multipliers,
    RateLimitOptions,
    RlsAddress,
    steered,
)
from xds_server.rls.service import (
    DEFAULT_RLS_PORT,
    PeerCallers,
    RateLimitService,
    start_rls_server,
)

log = logging.getLogger(__name__)

_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})


@dataclass(frozen=True)
class RateLimitSettings:
    """Settings of the rate-limit runtime. Units are in the names."""

    #: The global rate-limit service's port (0 = any free port); None serves none, and
    #: proxies then get no global filter. ``inferlane serve`` uses 8081 (SPEC); embedded
    #: control planes default to none, so several in one test run never contend for it.
    rls_port: int | None = None
    #: The host or IP proxies reach the service at. Empty: the address the control plane
    #: binds, or 127.0.0.1 when that is a wildcard. In a cluster, give the control plane's
    #: Service DNS name (proxies then resolve it: a STRICT_DNS cluster).
    rls_address: str = ""
    #: Redis URL (``redis://HOST:PORT/DB``, ``unix:///PATH``) for counters shared between
    #: replicas; None keeps them in this process.
    redis_url: str | None = None
    #: What to decide when Redis is unreachable; Envoy also applies it when the service
    #: itself does not answer in time (``failure_mode_deny`` for ``closed``).
    failure_mode: FailureMode = FailureMode.OPEN
    #: Seconds one Redis round trip may take before the failure mode decides.
    redis_timeout_s: float = 0.1
    #: Seconds Envoy waits for the service's answer.
    rls_timeout_s: float = DEFAULT_RLS_TIMEOUT_S
    #: Decide and count as usual but never refuse (envoyproxy/ratelimit's shadow mode).
    shadow_mode: bool = False
    #: How proxies charge token budgets (:class:`~ratelimit.tokens.TokenBudgetMode`).
    token_budget_mode: TokenBudgetMode = TokenBudgetMode.RESERVE
    #: Seconds between scrape rounds of the adaptive endpoints. One second resolves a
    #: queue building up well within the controller's default two-second hold.
    scrape_interval_s: float = 1.0
    #: Seconds one scrape may take; a slower endpoint counts as a failed scrape.
    scrape_timeout_s: float = 0.5
    #: Scrapes in flight at once, so a large Service does not open thousands of sockets.
    scrape_concurrency: int = 32
    #: Rounds an endpoint whose scrapes keep failing may be skipped, at most
    #: (:class:`~ratelimit.scrape.Backoff`): one that stops answering is scraped at least
    #: every ``scrape_backoff_rounds + 1`` rounds, one that answers again every round.
    scrape_backoff_rounds: int = 15
    #: Path of the model server's Prometheus page, on the endpoint's own port.
    metrics_path: str = "/metrics"
    #: Which series carry the saturation signals (vLLM's by default).
    metric_names: MetricNames = VLLM
    adaptive: AdaptiveSettings = field(default_factory=AdaptiveSettings)
    #: Weigh every GPU-backed endpoint by its queue in every caller's EDS
    #: (:func:`routing.endpoints.queue_weight`), scraping them each round. Off by default:
    #: it measured no better than least request alone (docs/performance.md, "Admission at
    #: the pod and load-aware choice"), and each change of a weight is an EDS push to every
    #: proxy.
    queue_weights: bool = False

    def problems(self) -> list[str]:
        out = list(self.adaptive.problems())
        if self.scrape_interval_s <= 0 or self.scrape_timeout_s <= 0:
            out.append("scrape interval and timeout must be positive")
        if self.scrape_concurrency < 1:
            out.append("scrape_concurrency must be at least 1")
        if self.scrape_backoff_rounds < 0:
            out.append("scrape_backoff_rounds must not be negative")
        if not self.metrics_path.startswith("/"):
            out.append("metrics_path must start with '/'")
        if self.rls_timeout_s <= 0 or self.redis_timeout_s <= 0:
            out.append("timeouts must be positive")
        return out


class RuntimeMetrics:
    """The runtime's own metrics (the service, counters and controller add theirs)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.scrapes = Counter(
            "inferlane_adaptive_scrapes_total",
            "Scrapes of adaptive endpoints' metrics, by result (ok, error).",
            ["result"],
            registry=registry,
        )
        self.backing_off = Gauge(
            "inferlane_adaptive_endpoints_backing_off",
            "Endpoints whose scrapes kept failing, skipped this round (scraped less often "
            "until one answers).",
            registry=registry,
        )
        self.round_seconds = Histogram(
            "inferlane_adaptive_scrape_round_seconds",
            "Time to scrape every adaptive endpoint once.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )
        self.targets = Gauge(
            "inferlane_adaptive_endpoints",
            "Endpoints of adaptive Services being scraped.",
            registry=registry,
        )
        self.pushes = Counter(
            "inferlane_adaptive_pushes_total",
            "Config pushes requested because adaptive limits changed.",
            registry=registry,
        )
        self.failure_mode = Gauge(
            "inferlane_ratelimit_failure_mode",
            "1 for the configured failure mode of the global rate-limit service.",
            ["mode"],
            registry=registry,
        )


def _counters(settings: RateLimitSettings, metrics: RateLimitMetrics) -> Counters:
    if settings.redis_url:
        return RedisCounters(
            settings.redis_url,
            failure_mode=settings.failure_mode,
            metrics=metrics,
            timeout_s=settings.redis_timeout_s,
        )
    return InMemoryCounters(failure_mode=settings.failure_mode, metrics=metrics)


def metrics_url(address: str, port: int, path: str) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}{path}"


def weighted_targets(world: World, metrics_path: str = "/metrics") -> dict[str, str]:
    """Endpoint key -> metrics URL, for each ready GPU-backed endpoint of every served
    Service: the endpoints whose queues weigh them in the callers' EDS."""
    return {
        endpoint_key(endpoint): metrics_url(endpoint.address, endpoint.port, metrics_path)
        for svc in served_services(world)
        for port in served_ports(svc)
        for endpoint in svc.endpoints_for(port.port)
        if endpoint.ready and endpoint.gpu
    }


def adaptive_targets(world: World, metrics_path: str = "/metrics") -> dict[str, str]:
    """Endpoint key -> metrics URL, for each ready endpoint of a Service the controller
    steers (adaptive, with a ``rate-limit`` or a ``max-concurrency`` to scale)."""
    targets: dict[str, str] = {}
    for svc in served_services(world):
        if not steered(svc):
            continue
        for port in served_ports(svc):
            for endpoint in svc.endpoints_for(port.port):
                if endpoint.ready:
                    targets[endpoint_key(endpoint)] = metrics_url(
                        endpoint.address, endpoint.port, metrics_path
                    )
    return targets


class RateLimitRuntime:
    """The global rate-limit service, the adaptive loop and their debug page."""

    def __init__(
        self,
        settings: RateLimitSettings | None = None,
        *,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings or RateLimitSettings()
        problems = self.settings.problems()
        if problems:
            raise ValueError("bad rate-limit settings: " + "; ".join(problems))
        self.on_change = on_change
        self.registry = registry or CollectorRegistry()
        self.metrics = RuntimeMetrics(self.registry)
        for mode in FailureMode:
            self.metrics.failure_mode.labels(str(mode)).set(
                1 if mode is self.settings.failure_mode else 0
            )
        self.counters = _counters(self.settings, RateLimitMetrics(self.registry))
        self.service = RateLimitService(self.counters, shadow_mode=self.settings.shadow_mode)
        self.controller = AdaptiveController(
            self.settings.adaptive, clock=clock, metrics=AdaptiveMetrics(self.registry)
        )
        self.scraper = Scraper(
            names=self.settings.metric_names, timeout_s=self.settings.scrape_timeout_s
        )
        self.backoff = Backoff(self.settings.scrape_backoff_rounds)
        self.world: World | None = None
        self._targets: dict[str, str] = {}
        #: Endpoints weighed by their queue, and their current weights (full ones too).
        self._weighted: dict[str, str] = {}
        self._weights: dict[str, int] = {}
        self._server: Any = None
        self.port: int | None = None
        self._address: RlsAddress | None = None
        self._unserved: set[str] = set()
        self.rounds = 0

    # -- the world --------------------------------------------------------------------

    def set_world(self, world: World) -> None:
        """New rules for the service, and the adaptive endpoints to scrape."""
        self.world = world
        self.service.set_rules(rules_from_world(world))
        if self.settings.rls_port is None:
            self._warn_unserved(world)
        targets = adaptive_targets(world, self.settings.metrics_path)
        for gone in set(self._targets) - set(targets):
            self.controller.forget(gone)
        self._targets = targets
        self.metrics.targets.set(len(targets))
        if self.settings.queue_weights:
            self._weighted = weighted_targets(world, self.settings.metrics_path)
            self._weights = {k: w for k, w in self._weights.items() if k in self._weighted}
        self.backoff.keep([*self._targets, *self._weighted])

    def _warn_unserved(self, world: World) -> None:
        """Say once per Service that its global limit or token budget has no service to
        enforce it."""
        limited = {f"{s.namespace}/{s.name}" for s in world.services if s.config.counted_per_caller}
        for name in sorted(limited - self._unserved):
            log.warning(
                "%s sets inferlane.io/global-rate-limit or token-budget, but this control plane "
                "runs no global rate-limit service (--rls-port off): it is not enforced",
                name,
            )
        self._unserved = limited

    def reset_adaptive(self) -> None:
        """Forget every endpoint's controller state (all limits back to the annotation's)
        and push. For benchmarks that run several scenarios on one control plane."""
        for key in self.controller.endpoints():
            self.controller.forget(key)
        self.on_change()

    @property
    def targets(self) -> Mapping[str, str]:
        return MappingProxyType(dict(self._targets))

    def multipliers(self) -> dict[str, Multipliers]:
        """Every scraped endpoint's multipliers that differ from 1 (the rest are untouched)."""
        out: dict[str, Multipliers] = {}
        for key in self._targets:
            mult = self.controller.multipliers(key)
            if any(mult.get(p, 1.0) != 1.0 for p in PRIORITIES):
                out[key] = mult
        return out

    def options(self) -> RateLimitOptions:
        """What the next generation's rate-limit pass reads: frozen, safe to share."""
        return RateLimitOptions(
            rls=self._address,
            failure_mode_deny=self.settings.failure_mode is FailureMode.CLOSED,
            rls_timeout_s=self.settings.rls_timeout_s,
            multipliers=MappingProxyType(self.multipliers()),
            weights=MappingProxyType(
                {k: w for k, w in sorted(self._weights.items()) if w != FULL_WEIGHT}
            ),
            token_budget_mode=self.settings.token_budget_mode,
        )

    # -- lifecycle ----------------------------------------------------------------------

    async def start(
        self, host: str, credentials: Any | None = None, trust_domain: str = DEFAULT_TRUST_DOMAIN
    ) -> int | None:
        """Start the global service (when a port is set); returns the bound port.

        With ``credentials`` (gRPC server credentials that require a client certificate
        from the mesh CA) every call is counted as its certificate's identity in
        ``trust_domain``, and proxies reach the service over mTLS; without, it is
        plaintext and trusts the descriptors (tests of the service alone).
        """
        port = self.settings.rls_port
        if port is None:
            return None
        self.service.callers = PeerCallers(trust_domain) if credentials is not None else None
        self._server, self.port = await start_rls_server(self.service, host, port, credentials)
        address = self.settings.rls_address or (host if host not in _WILDCARDS else "127.0.0.1")
        self._address = RlsAddress(address.strip("[]"), self.port, tls=credentials is not None)
        return self.port

    async def stop(self, grace: float | None = 0.2) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        self._address = None
        await self.scraper.close()
        await self.counters.close()

    async def run(self) -> None:
        """Scrape and step the controller every ``scrape_interval_s``, until cancelled."""
        loop = asyncio.get_running_loop()
        interval = self.settings.scrape_interval_s
        next_round = loop.time()
        while True:
            if self._targets or self._weighted:
                try:
                    await self.step()
                except Exception:  # keep limits as they are; the next round tries again
                    log.exception("adaptive round failed")
            next_round = max(next_round + interval, loop.time())
            await asyncio.sleep(next_round - loop.time())

    async def step(self) -> list[str]:
        """One round: scrape every target once, observe the adaptive ones, weigh the
        weighted ones, and trigger a push if limits or weights changed.

        Returns the endpoints whose multipliers or weights changed.
        """
        round_no = self.rounds
        targets = {
            k: url
            for k, url in {**self._weighted, **self._targets}.items()
            if self.backoff.due(k, round_no)
        }
        self.metrics.backing_off.set(self.backoff.backing_off(round_no))
        if not targets:
            self.rounds += 1
            return []
        started = time.perf_counter()
        gate = asyncio.Semaphore(self.settings.scrape_concurrency)

        async def scrape(url: str) -> SaturationSample | ScrapeError:
            async with gate:
                return await self.scraper.scrape(url)

        results = await asyncio.gather(*(scrape(url) for url in targets.values()))
        self.metrics.round_seconds.observe(time.perf_counter() - started)
        self.rounds += 1
        changed = []
        for key, result in zip(targets, results, strict=True):
            failed = isinstance(result, ScrapeError)
            self.metrics.scrapes.labels("error" if failed else "ok").inc()
            self.backoff.record(key, round_no, ok=not failed)
            if key in self._weighted and self._weigh(key, result):
                changed.append(key)
            if key not in self._targets:
                continue  # not adaptive, or gone from the world while we scraped
            if isinstance(result, ScrapeError):
                self.controller.observe_error(key, result.message)
                continue
            step = self.controller.observe(key, result)
            if step.changed:
                log.info("adaptive limits of %s: %s", key, step.state.last_change_reason)
                if key not in changed:
                    changed.append(key)
        if changed:
            self.metrics.pushes.inc()
            self.on_change()
        return changed

    def _weigh(self, key: str, result: SaturationSample | ScrapeError) -> bool:
        """Record ``key``'s queue weight (full on a failed scrape: no stale steering);
        True when it changed."""
        weight = FULL_WEIGHT if isinstance(result, ScrapeError) else queue_weight(result.waiting)
        old, self._weights[key] = self._weights.get(key, FULL_WEIGHT), weight
        if old != weight:
            log.info("queue weight of %s: %d -> %d", key, old, weight)
        return old != weight

    # -- debug ------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """``/debug/ratelimits``: the global service and the adaptive controller."""
        snapshot = self.controller.snapshot()
        endpoints = {e["endpoint"]: e for e in snapshot.to_dict()["endpoints"]}
        options = self.options()
        for svc, endpoint in self._adaptive_endpoints():
            key = endpoint_key(endpoint)
            entry = endpoints.setdefault(key, {"endpoint": key})
            entry["service"] = f"{svc.namespace}/{svc.name}"
            entry["metrics_url"] = self._targets.get(key)
            limits = class_limits(svc.config, options.multipliers.get(key))
            entry["rates"] = {str(p): r for p, r in limits.rate.items()}
            entry["concurrency"] = {str(p): c for p, c in limits.concurrency.items()}
        rls: dict[str, Any] = {
            "port": self.port,
            "address": None
            if self._address is None
            else f"{self._address.host}:{self._address.port}",
            "redis": self.settings.redis_url is not None,
            **self.service.debug(),
        }
        return {
            "global": rls,
            "queue_weights": {
                "enabled": self.settings.queue_weights,
                "endpoints": dict(sorted(self._weights.items())),
            },
            "adaptive": {
                "settings": snapshot.to_dict()["settings"],
                "scrape_interval_s": self.settings.scrape_interval_s,
                "rounds": self.rounds,
                "endpoints": [endpoints[k] for k in sorted(endpoints)],
            },
        }

    def _adaptive_endpoints(self) -> list[tuple[InferenceService, Endpoint]]:
        if self.world is None:
            return []
        return [
            (svc, endpoint)
            for svc in served_services(self.world)
            if steered(svc)
            for port in served_ports(svc)
            for endpoint in svc.endpoints_for(port.port)
        ]


@contextlib.asynccontextmanager
async def running_runtime(runtime: RateLimitRuntime, host: str) -> AsyncIterator[int | None]:
    """Start ``runtime``'s service; stop everything it holds on exit."""
    try:
        yield await runtime.start(host)
    finally:
        await runtime.stop()


__all__ = [
    "DEFAULT_RLS_PORT",
    "FailureMode",
    "RateLimitRuntime",
    "RateLimitSettings",
    "adaptive_targets",
    "running_runtime",
]
