"""``inferlane serve``: every part wired together and supervised in one place.

Data flows one way. A source publishes Worlds; each publish (and each sidecar connecting
or leaving, since endpoints address connected sidecars) triggers the debouncer; a flush
installs a new :class:`~routing.generator.MeshGenerator` in the cache and wakes every
stream, which pulls its snapshot when its push runs.

Mesh security (``mtls`` and ``xds_server/auth``) is set up first: the CA, the workload secrets
(whose renewals trigger the debouncer like any other change), the serving certificate of
the authenticated ports (TLS and mutual TLS, served by gRPC itself; the global rate-limit
service uses mutual TLS too), and the authorizer every stream passes.

All long-running parts run as named tasks of one ``asyncio.TaskGroup``: the first failure
cancels the rest and is re-raised, and shutdown stops the gRPC server with a grace period
so open streams end cleanly.

The event loop only serves: translating, serializing and signing run on one worker
thread (``ServeSettings.worker_thread``), shared by the config cache and the secret store,
so they never run at once and the same inputs give the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from mesh.model import World
from mesh.proxy import Proxy
from mesh.sources import WorldSource
from mtls.epoch import epoch_store
from mtls.identity import Identity, workload_identity
from mtls.metrics import CertificateExpiry
from mtls.publish import RootCertPublisher
from mtls.secrets import SecretStore
from mtls.store import load_ca
from mtls.tokens import KubernetesTokenReviewer, TokenReviewer
from routing.generator import MeshGenerator
from routing.secure import SecurityOptions
from xds_server.admin import Admin, serving_admin
from xds_server.ads import collector
from xds_server.ads.cache import ConfigCache
from xds_server.ads.debounce import Debouncer, DebounceSettings, PushReason, PushRequest
from xds_server.ads.looplag import LoopLagProbe
from xds_server.ads.server import SERVER_OPTIONS, ServerSettings, XdsServer
from xds_server.auth.authorizer import MeshAuthorizer
from xds_server.auth.settings import SecuritySettings
from xds_server.auth.transport import ServerCredentials, server_credentials
from xds_server.describer import DESCRIPTION as DESCRIBE_PAGE
from xds_server.describer import Describer
from xds_server.rls.runtime import RateLimitRuntime, RateLimitSettings
from xds_server.workers.hub import WorkerHub

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    manifests: Path | None = None
    kubernetes: bool = False
    host: str = "0.0.0.0"
    #: Istio's ports where one exists (docs/reference.md, "Ports"); 0 means any free port.
    xds_port: int = 15010
    #: The TLS xDS port, authenticated by service-account tokens (``inferlane serve`` uses
    #: 15012); None serves no TLS port, so that several control planes embedded in one test
    #: run do not contend for 15012.
    xds_tls_port: int | None = None
    #: The mutual-TLS xDS port, authenticated by client certificates from the mesh CA
    #: (``inferlane serve`` uses 15011); None serves none, as for the TLS port.
    xds_mtls_port: int | None = None
    admin_port: int = 15014
    ports_file: Path | None = None
    debounce: DebounceSettings = field(default_factory=DebounceSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    #: Seconds open streams get to finish on shutdown.
    shutdown_grace: float = 2.0
    security: SecuritySettings = field(default_factory=SecuritySettings)
    #: The global rate-limit service (its port: ``rls`` in the ports file) and adaptive
    #: limits. By default no service port, as for the TLS xDS port.
    ratelimit: RateLimitSettings = field(default_factory=RateLimitSettings)
    #: Translate, serialize and sign certificates on one worker thread, so that the event
    #: loop keeps serving meanwhile (its lag stays at milliseconds while a thousand
    #: identities rotate: docs/performance.md). False does that work on the event loop.
    worker_thread: bool = True
    #: Processes serving the plaintext xDS port (``inferlane serve --workers``); 1 serves
    #: every stream from this process.
    workers: int = 1
    #: The garbage collector's first threshold in this process and the workers, each then
    #: making a full collection every two minutes (``xds_server.ads.collector``); 0 leaves
    #: Python's defaults, as a control plane embedded in another program should.
    gc_threshold: int = 0


class ControlPlane:
    """The running control plane: source -> world -> cache -> streams.

    ``tokens`` checks service-account tokens on the TLS port; by default a TokenReview
    against the cluster when running with ``kubernetes``, and none otherwise. ``kube_api``
    is the Kubernetes ``ApiClient`` to use (the caller closes it); by default one is made
    from the in-cluster config or the kubeconfig when something needs it.

    With ``kubernetes``, the CA's root is published to every mesh namespace
    (:mod:`mtls.publish`), so injected sidecars mount it instead of carrying a CA file.
    """

    def __init__(
        self,
        settings: ServeSettings,
        source: WorldSource,
        *,
        tokens: TokenReviewer | None = None,
        kube_api: Any | None = None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.tokens = tokens
        self.kube_api = kube_api
        #: Set up in run() when running against Kubernetes.
        self.root_certs: RootCertPublisher | None = None
        #: Where heavy work runs (see ``ServeSettings.worker_thread``); shut down by run().
        self.worker = (
            ThreadPoolExecutor(1, thread_name_prefix="inferlane-worker")
            if settings.worker_thread
            else None
        )
        self.cache = ConfigCache(executor=self.worker)
        self.xds = XdsServer(self.cache, settings=settings.server)
        self.world: World | None = None
        self.debouncer = Debouncer(settings.debounce, self._flush)
        self.xds.on_sidecars_changed = lambda: self.debouncer.trigger(PushReason.PROXY)
        #: The global rate-limit service and the adaptive loop; a limit change is a change.
        self.ratelimits = RateLimitRuntime(
            settings.ratelimit, on_change=lambda: self.debouncer.trigger(PushReason.ADAPTIVE)
        )
        #: Certificate expiry, read from the secret store at scrape time.
        self.cert_metrics = CollectorRegistry()
        self.cert_metrics.register(CertificateExpiry(lambda: self.secrets))
        #: The worker processes that serve the plaintext port (``--workers N``, N > 1).
        self.hub = (
            WorkerHub(
                settings.workers,
                self.cache,
                settings=settings.server,
                authorizer=lambda: self.xds.authorizer,
                on_sidecars_changed=lambda: self.debouncer.trigger(PushReason.PROXY),
                own_metrics=self.xds.metrics.registry,
                gc_threshold=settings.gc_threshold,
            )
            if settings.workers > 1
            else None
        )
        self.admin = Admin(
            self.xds,
            world=lambda: self.world,
            ready=self._ready,
            registries=(self.ratelimits.registry, self.cert_metrics),
            workers=self.hub,
        )
        self.admin.add_json_page(
            "/debug/ratelimits",
            "global rate-limit rules and counter store; adaptive limits per endpoint, with reasons",
            self.ratelimits.describe,
        )
        self.admin.add_json_page(
            "/debug/certs",
            "the mesh CA's root and each served identity's certificate (no keys)",
            self._describe_certs,
        )
        self.admin.add_query_page(
            "/debug/describe",
            DESCRIBE_PAGE,
            Describer(
                self.xds,
                lambda: self._generator,
                self._adaptive_endpoints,
                workers=self._workers_syncz if self.hub is not None else None,
            ),
        )
        self.loop_lag = LoopLagProbe(self.xds.metrics.registry)
        self.ports: dict[str, int] = {}
        self.started = asyncio.Event()
        #: Set up in run(): the workload secrets and the authenticated ports' credentials.
        self.secrets: SecretStore | None = None
        self.credentials: ServerCredentials | None = None
        self.tls_options = SecurityOptions(
            trust_domain=settings.security.trust_domain,
            connection_lifetime_s=settings.security.connection_lifetime_s,
        )
        self._generator: MeshGenerator | None = None

    def _ready(self) -> bool:
        return self.world is not None

    def publish(self, world: World) -> None:
        first = self.world is None
        self.world = world  # the source logs each new annotation or input error once
        self.ratelimits.set_world(world)
        if self.root_certs is not None:
            self.root_certs.set_world(world)
        if first:
            log.info("first world loaded: %d inference services", len(world.services))
        self.debouncer.trigger(PushReason.WORLD)

    def _identity(self, proxy: Proxy) -> Identity | None:
        if self.world is None:
            return None
        return workload_identity(self.world, proxy, self.tls_options.trust_domain)

    def _proxies(self) -> Iterator[Proxy]:
        """Every connected proxy, this process's and the workers'."""
        yield from (c.proxy for c in self.xds.connections.values())
        if self.hub is not None:
            yield from self.hub.proxies()

    def _identities_in_use(self) -> set[Identity]:
        found = (self._identity(p) for p in self._proxies())
        return {identity for identity in found if identity is not None}

    async def _flush(self, push: PushRequest) -> None:
        if self.world is None:
            return
        # Endpoints are addressed through a sidecar (over mTLS) only if it can terminate
        # mTLS: it has a workload identity and so gets a certificate.
        connected = self.xds.sidecars()
        if self.hub is not None:
            connected |= self.hub.sidecars()
        sidecars = {k: p for k, p in connected.items() if self._identity(p) is not None}
        generator = MeshGenerator(
            self.world,
            sidecars,
            self.secrets,
            tls=self.tls_options,
            limits=self.ratelimits.options(),
            previous=self._generator,
        )
        if push.reasons.keys() <= {PushReason.PROXY} and generator.same_routing_as(self._generator):
            # Sidecars came or went without moving an endpoint: every stream keeps its
            # snapshot, and a connection storm costs no generation per debounce.
            log.debug("%s changes no proxy's config: nothing to push", push.describe())
            return
        self._generator = generator
        self.cache.update(generator, push.first_change)
        self.xds.push_all(push)
        if self.hub is not None:
            await self.hub.push()

    async def renew_certificates(self) -> int:
        """Give every workload a new key now (``SIGUSR1``: after a suspected key
        compromise), here and, through the stored key epoch, in every replica; returns how
        many identities had a certificate."""
        if self.secrets is None:
            return 0
        log.warning("replacing every workload certificate now")
        count = await self.secrets.rotate_all()
        log.warning("replaced %d workload certificates (key epoch %d)", count, self.secrets.epoch)
        return count

    async def _workers_syncz(self) -> list[dict[str, Any]]:
        return await self.hub.gather("syncz") if self.hub is not None else []

    def _adaptive_endpoints(self) -> list[dict[str, Any]]:
        endpoints: list[dict[str, Any]] = self.ratelimits.describe()["adaptive"]["endpoints"]
        return endpoints

    def _describe_certs(self) -> dict[str, Any]:
        if self.secrets is None:
            return {"ready": False}
        return {"ready": True, **self.secrets.describe()}

    async def _kubernetes_api(self, stack: contextlib.AsyncExitStack) -> Any | None:
        """An API client, when something needs one: the CA Secret, token reviews or the
        root certificate's ConfigMaps."""
        s = self.settings
        if self.kube_api is not None:
            return self.kube_api
        if not s.security.ca_secret and not s.kubernetes:
            return None
        from mesh.kube import new_api_client

        api = await new_api_client()
        stack.push_async_callback(api.close)
        return api

    async def _set_up_security(self, stack: contextlib.AsyncExitStack) -> None:
        """The CA, the secret store, the authenticated ports' credentials and the stream
        authorizer."""
        from kubernetes.aio.client import AuthenticationV1Api, CoreV1Api

        sec = self.settings.security
        api = await self._kubernetes_api(stack)
        core = CoreV1Api(api) if api is not None else None
        ca = await load_ca(ca_secret=sec.ca_secret, ca_dir=sec.ca_dir, secrets_api=core)
        log.info("mesh CA root sha256 %s, trust domain %s", ca.root_fingerprint, sec.trust_domain)
        # Read before anything is issued: certificates derive under the stored key epoch.
        epochs = epoch_store(ca_secret=sec.ca_secret, ca_dir=sec.ca_dir, configmaps=core)
        epoch = await epochs.read() if epochs is not None else 0
        self.secrets = SecretStore(
            ca,
            sec.trust_domain,
            ttl=sec.cert_ttl,
            executor=self.worker,
            epochs=epochs,
            epoch=epoch,
        )
        self.secrets.on_change = lambda: self.debouncer.trigger(PushReason.SECRET)
        tokens = self.tokens
        if tokens is None and api is not None and self.settings.kubernetes:
            tokens = KubernetesTokenReviewer(AuthenticationV1Api(api), sec.token_audience)
        if api is not None and self.settings.kubernetes:
            secrets = self.secrets
            self.root_certs = RootCertPublisher(CoreV1Api(api), lambda: secrets.trust_bundle_pem)
            if self.world is not None:
                self.root_certs.set_world(self.world)
        s = self.settings
        if (s.xds_tls_port, s.xds_mtls_port, s.ratelimit.rls_port) != (None, None, None):
            names = list(dict.fromkeys([*sec.server_names, s.host]))
            names = [n for n in names if n not in ("", "0.0.0.0", "::")]
            self.credentials = await asyncio.to_thread(server_credentials, ca, names)
        self.xds.authorizer = MeshAuthorizer(
            ca=ca,
            world=lambda: self.world,
            trust_domain=sec.trust_domain,
            plaintext_secrets_from=sec.plaintext_secrets_from,
            tokens=tokens,
        )

    async def run(self, on_started: Callable[[dict[str, int]], None] | None = None) -> None:
        s = self.settings
        grpc_server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", s.server.max_request_bytes),
                *SERVER_OPTIONS,
            ]
        )
        self.xds.add_to(grpc_server)
        async with contextlib.AsyncExitStack() as stack:
            if self.worker is not None:
                # Last out: a build still running finishes on its own, unwaited.
                stack.callback(self.worker.shutdown, wait=False, cancel_futures=True)
            await stack.enter_async_context(collector.tuned(s.gc_threshold))
            await self._set_up_security(stack)
            assert self.secrets is not None
            # gRPC raises when it cannot bind a port. With workers, they serve the
            # plaintext port; this process serves the authenticated ones.
            ports: dict[str, int] = {}
            if self.hub is None:
                ports["xds"] = grpc_server.add_insecure_port(f"{_host(s.host)}:{s.xds_port}")
            if self.credentials is not None:
                for name, port, credentials in (
                    ("xds_tls", s.xds_tls_port, self.credentials.tls),
                    ("xds_mtls", s.xds_mtls_port, self.credentials.mtls),
                ):
                    if port is not None:
                        address = f"{_host(s.host)}:{port}"
                        ports[name] = grpc_server.add_secure_port(address, credentials)
            if ports:
                await grpc_server.start()
                stack.push_async_callback(grpc_server.stop, s.shutdown_grace)
            if self.hub is not None:
                stack.push_async_callback(self.hub.close)
                ports = {"xds": await self.hub.start(s.host, s.xds_port), **ports}
            stack.push_async_callback(self.ratelimits.stop)
            rls_port = await self.ratelimits.start(
                s.host,
                self.credentials.mtls if self.credentials else None,
                s.security.trust_domain,
            )
            if rls_port is not None:
                ports["rls"] = rls_port
            admin_port = await stack.enter_async_context(
                serving_admin(self.admin, s.host, s.admin_port)
            )
            self.ports = {**ports, "admin": admin_port}
            log.info("serving on %s: %s", s.host, json.dumps(self.ports))
            if s.ports_file is not None:
                s.ports_file.write_text(json.dumps(self.ports))
            if on_started is not None:
                on_started(self.ports)
            self.started.set()
            # No task awaits grpc_server.wait_for_termination(): cancelling that await
            # cancels the server's own shutdown future, and stop(grace) then returns at once
            # without ending open streams (proxies would stay on a stopped control plane).
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.source.run(self.publish), name="world-source")
                tasks.create_task(self.debouncer.run(), name="debouncer")
                tasks.create_task(self.secrets.run(self._identities_in_use), name="secret-renewal")
                tasks.create_task(self.ratelimits.run(), name="adaptive-limits")
                tasks.create_task(self.loop_lag.run(), name="loop-lag")
                if self.hub is not None:
                    tasks.create_task(self.hub.run(), name="workers")
                if self.root_certs is not None:
                    tasks.create_task(self.root_certs.run(), name="root-cert-publisher")


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def make_source(settings: ServeSettings) -> WorldSource:
    if settings.manifests is not None:
        from mesh.manifests import ManifestSource

        return ManifestSource(settings.manifests)
    if settings.kubernetes:
        from mesh.kube import KubernetesSource, new_api_client

        return KubernetesSource(new_api_client)
    raise ValueError("give --manifests PATH or --kubernetes")


async def serve(settings: ServeSettings) -> None:
    """Run until SIGINT or SIGTERM."""
    plane = ControlPlane(settings, make_source(settings))
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, lambda: task.cancel() if task else None)
    renewals: set[asyncio.Task[int]] = set()

    def renew() -> None:
        renewal = asyncio.create_task(plane.renew_certificates(), name="renew-certificates")
        renewals.add(renewal)
        renewal.add_done_callback(renewals.discard)

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGUSR1, renew)
    with contextlib.suppress(asyncio.CancelledError):
        await plane.run()
    log.info("stopped")
