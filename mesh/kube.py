"""Worlds from a Kubernetes API server: list + watch with the official asyncio client.

:class:`KubernetesSource` runs one reflector per resource (Services, EndpointSlices,
Pods, Nodes; all namespaces), as client-go's informers do:

1. list (paged), remember the list's resourceVersion, replace that resource's store;
2. watch from that resourceVersion with bookmarks and a server-side timeout, applying
   each event to the store; a clean close resumes from the last resourceVersion seen
   (events and bookmarks both advance it);
3. a 410 Gone (an ERROR event with code 410, or an ApiException with status 410) means
   the history was compacted past our resourceVersion: list again;
4. connection errors and other API errors back off exponentially (capped, with jitter)
   and resume from the last resourceVersion.

A separate task rebuilds the World whenever a store changed, once every resource has
been listed at least once, and publishes it only if it differs from the last one, so a
relist that returns the same objects publishes nothing. Stores hold raw dicts, so
:func:`mesh.build.build_world` reads API objects and manifest files alike.

All tasks share one event loop; stores are plain dicts touched only from that loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
from kubernetes.aio import client, config
from kubernetes.aio import watch as kube_watch
from kubernetes.aio.client.exceptions import ApiException

from mesh.build import build_world
from mesh.model import AnnotationError, InferenceService, World
from mesh.sources import ChangeFilter, Publish

logger = logging.getLogger(__name__)

# kubernetes.aio's config and watch modules have no annotations (its client does).
_config: Any = config

#: An ``ApiClient`` factory, for example :func:`new_api_client`.
ApiClientFactory = Callable[[], Awaitable[Any]]

#: A watch that ends sooner than this without a single event is suspicious; back off.
SHORT_WATCH_S = 1.0

#: Errors that mean "the connection or the request failed; try again later".
_TRANSIENT = (aiohttp.ClientError, OSError, asyncio.TimeoutError, json.JSONDecodeError)


async def new_api_client(*, kubeconfig: str | None = None, context: str | None = None) -> Any:
    """A ``kubernetes.aio`` ApiClient: in-cluster config inside a Pod, else the kubeconfig.

    Raises ``kubernetes.aio.config.ConfigException`` when neither is available.
    """
    configuration = client.Configuration()
    if kubeconfig is None and context is None:
        try:
            _config.load_incluster_config(client_configuration=configuration)
        except _config.ConfigException:
            pass
        else:
            logger.info("kubernetes: in-cluster config, API server %s", configuration.host)
            return client.ApiClient(configuration=configuration)
    await _config.load_kube_config(
        config_file=kubeconfig, context=context, client_configuration=configuration
    )
    logger.info("kubernetes: kubeconfig, API server %s", configuration.host)
    return client.ApiClient(configuration=configuration)


@dataclass(frozen=True)
class WatchSettings:
    """Timing of the list/watch loops. Defaults follow client-go's reflector."""

    #: Server-side watch timeout (``timeoutSeconds``). The watch then ends cleanly and is
    #: resumed; client-go picks 5 to 10 minutes.
    watch_timeout_s: int = 300
    #: Extra client-side time on top of the server's timeout before one watch request
    #: is abandoned: catches a connection that went silent without closing.
    watch_grace_s: float = 30.0
    #: Limit on one list request (one page).
    list_timeout_s: float = 60.0
    #: Objects per list page; client-go uses 500.
    list_page_size: int = 500
    #: First retry delay after an error; doubled per consecutive failure.
    backoff_initial_s: float = 0.5
    #: Longest retry delay (client-go's reflector caps at 30 s).
    backoff_max_s: float = 30.0


class Backoff:
    """Capped exponential backoff with jitter: each delay is drawn from [d/2, d]."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self._initial = initial
        self._maximum = maximum
        self._rng = rng or random.Random()
        self._failures = 0

    def reset(self) -> None:
        self._failures = 0

    def next_delay(self) -> float:
        ceiling = min(self._maximum, self._initial * 2**self._failures)
        self._failures = min(self._failures + 1, 62)
        return self._rng.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class _Resource:
    kind: str
    api_version: str
    #: The client API class and its list-all method.
    api: str
    method: str


RESOURCES: tuple[_Resource, ...] = (
    _Resource("Service", "v1", "CoreV1Api", "list_service_for_all_namespaces"),
    _Resource(
        "EndpointSlice",
        "discovery.k8s.io/v1",
        "DiscoveryV1Api",
        "list_endpoint_slice_for_all_namespaces",
    ),
    _Resource("Pod", "v1", "CoreV1Api", "list_pod_for_all_namespaces"),
    _Resource("Node", "v1", "CoreV1Api", "list_node"),
)


@dataclass
class _Cursor:
    """Where one resource's watch resumes: None means list first."""

    version: str | None = None


class _Gone(Exception):
    """The resourceVersion is too old (HTTP 410): list again."""


class _RawWatch(kube_watch.Watch):
    """The client's watch helper without model deserialisation: events carry plain dicts.

    Plain dicts are what :func:`build_world` reads, and skipping the pydantic models
    saves most of the per-event cost. Everything else (resourceVersion tracking from
    events and bookmarks, 410 handling) is the helper's own.
    """

    def get_return_type(self, func: Any) -> None:
        return None


#: The watch class as an untyped factory: its constructor has no annotations.
_new_watch: Callable[[], Any] = _RawWatch


class KubernetesSource:
    """A :class:`~mesh.sources.WorldSource` backed by the Kubernetes API (all namespaces).

    ``api`` is a ``kubernetes.aio`` ``ApiClient`` (which the caller closes), or an async
    factory of one, such as :func:`new_api_client` (the source then closes it). With
    ``post_events``, Services with annotation errors get a Warning Event once per
    distinct error set (see :func:`post_annotation_events`).
    """

    def __init__(
        self,
        api: Any,
        *,
        settings: WatchSettings | None = None,
        post_events: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self._api_or_factory = api
        self._settings = settings or WatchSettings()
        self._post_events = post_events
        self._rng = rng or random.Random()
        self._stores: dict[str, dict[tuple[str, str], Mapping[str, Any]]] = {}
        self._synced: set[str] = set()
        self._dirty = asyncio.Event()
        self._events_due = asyncio.Event()
        self._latest: World | None = None
        #: The last World whose annotation errors were checked for Events (tests, debug).
        self.events_checked: World | None = None

    async def run(self, publish: Publish) -> None:
        api, owned = await self._open()
        self._stores = {r.kind: {} for r in RESOURCES}
        self._synced = set()
        try:
            # Building the generated API classes takes about a second (pydantic compiles
            # their validators); do it off the event loop, once.
            apis = await asyncio.to_thread(_api_objects, api)
            async with asyncio.TaskGroup() as tasks:
                for resource in RESOURCES:
                    tasks.create_task(
                        self._reflect(apis[resource.api], resource),
                        name=f"kube-reflect-{resource.kind}",
                    )
                tasks.create_task(self._publish_loop(publish), name="kube-publish")
                if self._post_events:
                    recorder = ApiEventRecorder(apis["CoreV1Api"])
                    tasks.create_task(self._event_loop(recorder), name="kube-events")
        finally:
            if owned:
                await api.close()

    async def _open(self) -> tuple[Any, bool]:
        if isinstance(self._api_or_factory, client.ApiClient):
            return self._api_or_factory, False
        return await self._api_or_factory(), True

    # --- world building -------------------------------------------------------------

    def _objects(self) -> Iterator[Mapping[str, Any]]:
        for store in self._stores.values():
            yield from store.values()

    async def _publish_loop(self, publish: Publish) -> None:
        changes = ChangeFilter(publish)
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if len(self._synced) < len(RESOURCES):
                continue
            # Stored objects are replaced, never mutated, so a snapshot of the references
            # can be read in a worker thread while the watches keep running.
            snapshot = list(self._objects())
            world = await asyncio.to_thread(build_world, snapshot)
            if changes(world):
                logger.info(
                    "kubernetes: %d enabled services, %d workloads",
                    len(world.services),
                    len(world.workloads),
                )
                self._latest = world
                self._events_due.set()

    async def _event_loop(self, recorder: EventRecorder) -> None:
        posted: dict[tuple[str, str], frozenset[AnnotationError]] = {}
        while True:
            await self._events_due.wait()
            self._events_due.clear()
            world = self._latest
            if world is not None:
                await post_annotation_events(recorder, world, posted)
                self.events_checked = world

    # --- one reflector per resource -------------------------------------------------

    async def _reflect(self, api_object: Any, resource: _Resource) -> None:
        """List, then watch, forever; relist on 410, back off on errors."""
        backoff = Backoff(self._settings.backoff_initial_s, self._settings.backoff_max_s, self._rng)
        cursor = _Cursor()
        while True:
            try:
                if cursor.version is None:
                    await self._list(api_object, resource, cursor)
                    backoff.reset()
                loop = asyncio.get_running_loop()
                started = loop.time()
                events = await self._watch(api_object, resource, cursor, backoff)
                if events == 0 and loop.time() - started < SHORT_WATCH_S:
                    # A server that ends every watch at once must not make us spin.
                    await asyncio.sleep(backoff.next_delay())
            except _Gone:
                logger.info(
                    "kubernetes: %s resourceVersion %s expired; relisting",
                    resource.kind,
                    cursor.version,
                )
                cursor.version = None
            except ApiException as exc:
                if exc.status == 410:
                    logger.info("kubernetes: %s list expired (410); relisting", resource.kind)
                    cursor.version = None
                    continue
                delay = backoff.next_delay()
                logger.warning(
                    "kubernetes: %s: API error %s %s; retrying in %.1f s",
                    resource.kind,
                    exc.status,
                    exc.reason,
                    delay,
                )
                await asyncio.sleep(delay)
            except _TRANSIENT as exc:
                delay = backoff.next_delay()
                logger.warning(
                    "kubernetes: %s: %s; retrying in %.1f s",
                    resource.kind,
                    _describe(exc),
                    delay,
                )
                await asyncio.sleep(delay)
            except Exception:
                # An unexpected response (the watch helper raises a bare Exception for
                # malformed events): keep the source alive, as client-go's reflector does.
                delay = backoff.next_delay()
                logger.exception(
                    "kubernetes: %s: unexpected error; retrying in %.1f s", resource.kind, delay
                )
                await asyncio.sleep(delay)

    async def _list(self, api_object: Any, resource: _Resource, cursor: _Cursor) -> None:
        """List every object (all pages); replace the store; set the cursor's version."""
        method = getattr(api_object, resource.method + "_without_preload_content")
        items: dict[tuple[str, str], Mapping[str, Any]] = {}
        token: str | None = None
        version = ""
        while True:
            response = await method(
                limit=self._settings.list_page_size,
                _continue=token,
                _request_timeout=float(self._settings.list_timeout_s),
            )
            try:
                body = await response.read()
                if response.status != 200:
                    raise ApiException(status=response.status, reason=_status_message(body))
            finally:
                response.release()
            page = json.loads(body)
            for raw in page.get("items") or []:
                obj = _normalise(raw, resource)
                if obj is not None:
                    items[_key(obj)] = obj
            meta = page.get("metadata") or {}
            version = meta.get("resourceVersion") or version
            token = meta.get("continue") or None
            if token is None:
                break
        self._stores[resource.kind] = items
        first = resource.kind not in self._synced
        self._synced.add(resource.kind)
        self._dirty.set()
        logger.info(
            "kubernetes: %s %s: %d objects at resourceVersion %s",
            "listed" if first else "relisted",
            resource.kind,
            len(items),
            version,
        )
        cursor.version = version

    async def _watch(
        self, api_object: Any, resource: _Resource, cursor: _Cursor, backoff: Backoff
    ) -> int:
        """Watch from the cursor until the server ends the watch; return the event count.

        The cursor follows every event and bookmark, so after a dropped connection the
        next watch resumes from the last resourceVersion seen.
        """
        method = getattr(api_object, resource.method)
        timeout = self._settings.watch_timeout_s
        watch: Any = _new_watch()
        stream = watch.stream(
            method,
            resource_version=cursor.version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _request_timeout=float(timeout + self._settings.watch_grace_s),
        )
        store = self._stores[resource.kind]
        events = 0
        try:
            async for event in stream:
                if not isinstance(event, Mapping):
                    continue  # a line that is not JSON; the helper passes it through
                kind = event.get("type")
                obj = event.get("raw_object")
                if kind in ("ADDED", "MODIFIED") and isinstance(obj, Mapping):
                    normal = _normalise(obj, resource)
                    if normal is not None:
                        store[_key(normal)] = normal
                        self._dirty.set()
                elif kind == "DELETED" and isinstance(obj, Mapping):
                    normal = _normalise(obj, resource)
                    if normal is not None and store.pop(_key(normal), None) is not None:
                        self._dirty.set()
                cursor.version = watch.resource_version or cursor.version
                events += 1
                backoff.reset()
        except ApiException as exc:
            if exc.status == 410:
                raise _Gone() from exc
            raise
        finally:
            await watch.close()
        return events


def _api_objects(api: Any) -> dict[str, Any]:
    return {name: getattr(client, name)(api) for name in sorted({r.api for r in RESOURCES})}


def _normalise(raw: Mapping[str, Any], resource: _Resource) -> Mapping[str, Any] | None:
    """The object with its kind set (list items have none) and managedFields dropped."""
    meta = raw.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        logger.warning("kubernetes: a %s without metadata.name; ignored", resource.kind)
        return None
    slim_meta = {k: v for k, v in meta.items() if k != "managedFields"}
    return {**raw, "kind": resource.kind, "apiVersion": resource.api_version, "metadata": slim_meta}


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj["metadata"]
    return (str(meta.get("namespace") or ""), str(meta["name"]))


def _status_message(body: bytes) -> str:
    try:
        status = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace")
    if isinstance(status, Mapping):
        return f"{status.get('reason')}: {status.get('message')}"
    return str(status)[:200]


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- Events for annotation errors ------------------------------------------------------


class EventRecorder(Protocol):
    async def create_event(self, namespace: str, event: Mapping[str, Any]) -> bool:
        """Create a core/v1 Event; return False if one with that name exists already."""
        ...


class ApiEventRecorder:
    """An :class:`EventRecorder` that creates Events through the Kubernetes API.

    ``core`` is a ``kubernetes.aio`` ``CoreV1Api``, or an ``ApiClient`` to make one from.
    """

    def __init__(self, core: Any) -> None:
        self._core = core if isinstance(core, client.CoreV1Api) else client.CoreV1Api(core)

    async def create_event(self, namespace: str, event: Mapping[str, Any]) -> bool:
        body: Any = client.CoreV1Event.from_dict(dict(event))
        try:
            await self._core.create_namespaced_event(namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True


#: The Event reason for annotation errors.
EVENT_REASON = "InvalidAnnotation"
EVENT_COMPONENT = "inferlane"
#: Kubernetes truncates longer Event messages; keep ours whole.
MAX_EVENT_MESSAGE = 1024


def annotation_event(
    service: InferenceService, errors: frozenset[AnnotationError], now: datetime
) -> dict[str, Any]:
    """The Warning Event for ``service`` and its annotation ``errors``.

    The name is derived from the Service and the error set, so several control-plane
    replicas (or a restart) create one Event, not one each: the second create gets 409.
    """
    text = "\n".join(sorted(str(e) for e in errors))
    digest = hashlib.sha256(f"{service.key}\n{text}".encode()).hexdigest()[:16]
    message = "; ".join(sorted(str(e) for e in errors))
    if len(message) > MAX_EVENT_MESSAGE:
        message = message[: MAX_EVENT_MESSAGE - 3] + "..."
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    involved: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "namespace": service.namespace,
        "name": service.name,
    }
    if service.uid:
        involved["uid"] = service.uid
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{service.name}.inferlane-{digest}", "namespace": service.namespace},
        "involvedObject": involved,
        "type": "Warning",
        "reason": EVENT_REASON,
        "message": message,
        "source": {"component": EVENT_COMPONENT},
        "reportingComponent": EVENT_COMPONENT,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


async def post_annotation_events(
    recorder: EventRecorder,
    world: World,
    posted: MutableMapping[tuple[str, str], frozenset[AnnotationError]],
    *,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> int:
    """Post one Warning Event per Service whose annotation error set is new.

    ``posted`` remembers, per Service, the error set last posted; pass the same mapping
    on every call. A Service whose errors are unchanged gets nothing; one whose errors
    are gone is forgotten, so the same mistake made again later is reported again. A
    failed post is logged and retried on the next call. Returns the number created.
    """
    created = 0
    current = {svc.key: svc for svc in world.services if svc.errors}
    for key in [k for k in posted if k not in current]:
        del posted[key]
    for key, service in sorted(current.items()):
        errors = frozenset(service.errors)
        if posted.get(key) == errors:
            continue
        event = annotation_event(service, errors, now())
        try:
            fresh = await recorder.create_event(service.namespace, event)
        except (ApiException, *_TRANSIENT) as exc:
            logger.warning(
                "kubernetes: could not post an event for Service %s/%s: %s",
                service.namespace,
                service.name,
                _describe(exc),
            )
            continue
        posted[key] = errors
        if fresh:
            created += 1
            logger.info(
                "kubernetes: posted %s event for Service %s/%s: %s",
                EVENT_REASON,
                service.namespace,
                service.name,
                event["message"],
            )
    return created
