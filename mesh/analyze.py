"""What will not work in a World, as ``istioctl analyze`` reports it: pure, no I/O.

:func:`analyze` reads a :class:`~mesh.model.World` (from manifest files or a live cluster,
the same sources ``inferlane serve`` uses) and returns :class:`Finding` s, each with a
stable code, a severity, the object it is about, what is wrong and how to fix it.
``inferlane analyze`` prints them; an Error makes it exit non-zero.

Each check is one small function over the world. The codes are part of the contract:
scripts match on them, so a code is never reused for another check.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from mesh import annotations as ann
from mesh.model import InferenceService, MtlsMode, Workload, World


class Severity(enum.StrEnum):
    ERROR = "Error"
    WARNING = "Warning"


@dataclass(frozen=True)
class Check:
    """One kind of finding: its code, its name and what it is about."""

    code: str
    name: str
    summary: str


INVALID_ANNOTATION = Check(
    "IL0001",
    "InvalidAnnotation",
    "an inferlane.io annotation has a bad value or an unknown name; it is served at its default",
)
IGNORED_INPUT = Check(
    "IL0002",
    "IgnoredInput",
    "an object cannot be read, or a Service's inferlane.io annotations have no effect",
)
UNKNOWN_CRITICAL_CALLER = Check(
    "IL0003",
    "UnknownCriticalCaller",
    "critical-callers names a service account that no pod runs as",
)
NO_ENDPOINTS = Check(
    "IL0004", "NoEndpoints", "an inference Service has no ready endpoint: every request fails"
)
NO_GPU_ENDPOINTS = Check(
    "IL0005",
    "NoGpuEndpoints",
    "an inference Service has only fallback (CPU) endpoints: no request reaches a GPU",
)
ENDPOINT_WITHOUT_SIDECAR = Check(
    "IL0006",
    "EndpointWithoutSidecar",
    "a pod backing an inference Service has no sidecar: no inbound limits, mTLS or "
    "caller check there",
)
STRICT_CALLER_WITHOUT_SIDECAR = Check(
    "IL0007",
    "StrictCallerWithoutSidecar",
    "a critical caller of an mtls: strict Service has no sidecar, so its requests are refused",
)
CONCURRENCY_ABOVE_CAPACITY = Check(
    "IL0008",
    "ConcurrencyAboveCapacity",
    "max-concurrency is above the sequences a backing model server runs (--max-num-seqs)",
)

#: Every check, in code order (for the reference docs and the JSON output).
CHECKS: tuple[Check, ...] = (
    INVALID_ANNOTATION,
    IGNORED_INPUT,
    UNKNOWN_CRITICAL_CALLER,
    NO_ENDPOINTS,
    NO_GPU_ENDPOINTS,
    ENDPOINT_WITHOUT_SIDECAR,
    STRICT_CALLER_WITHOUT_SIDECAR,
    CONCURRENCY_ABOVE_CAPACITY,
)


@dataclass(frozen=True)
class Finding:
    check: Check
    severity: Severity
    #: ``KIND NAMESPACE/NAME`` (``Service default/llama``), or a file for unreadable input.
    object: str
    message: str
    fix: str

    @property
    def code(self) -> str:
        return self.check.code

    def to_dict(self) -> dict[str, str]:
        return {
            "code": self.check.code,
            "name": self.check.name,
            "severity": self.severity.value,
            "object": self.object,
            "message": self.message,
            "fix": self.fix,
        }


def analyze(world: World) -> tuple[Finding, ...]:
    """Every finding about ``world``: Errors first, then by code and object."""
    found = [finding for check in _CHECKS for finding in check(world)]
    order = {Severity.ERROR: 0, Severity.WARNING: 1}
    return tuple(sorted(found, key=lambda f: (order[f.severity], f.code, f.object, f.message)))


# --- the checks --------------------------------------------------------------------------


def _service(svc: InferenceService) -> str:
    return f"Service {svc.namespace}/{svc.name}"


def _pod(workload: Workload) -> str:
    return f"Pod {workload.namespace}/{workload.name}"


def _invalid_annotations(world: World) -> Iterator[Finding]:
    for svc in world.services:
        for err in svc.errors:
            yield Finding(
                INVALID_ANNOTATION,
                Severity.ERROR,
                _service(svc),
                f"{err}; served as if it were not set",
                f"correct {err.annotation} (docs/reference.md lists each annotation's values)",
            )


def _ignored_input(world: World) -> Iterator[Finding]:
    for problem in world.source_errors:
        fix = (
            f'add {ann.ENABLED}: "true", or remove the inferlane.io annotations'
            if problem.warning
            else "correct what the message names; until then the object is left out"
        )
        yield Finding(
            IGNORED_INPUT,
            Severity.WARNING if problem.warning else Severity.ERROR,
            problem.source,
            problem.message,
            fix,
        )


def _unknown_critical_callers(world: World) -> Iterator[Finding]:
    accounts = {(w.namespace, w.service_account) for w in world.workloads.values()}
    namespaces = {namespace for namespace, _ in accounts}
    for svc in world.services:
        for caller in svc.config.critical_callers:
            identity = ann.entry_identity(caller)
            if identity is None:
                continue  # the parser keeps only well-formed entries
            namespace, account = identity
            known = namespace in namespaces if account == "*" else (namespace, account) in accounts
            if known:
                continue
            what = (
                f"no pod runs in namespace {namespace}"
                if account == "*"
                else f"no pod runs as service account {namespace}/{account}"
            )
            yield Finding(
                UNKNOWN_CRITICAL_CALLER,
                Severity.WARNING,
                _service(svc),
                f"{ann.CRITICAL_CALLERS} names {caller}, but {what}",
                "correct the entry (namespace/serviceaccount, as the caller's pods run), "
                "or remove it",
            )


def _endpoint_coverage(world: World) -> Iterator[Finding]:
    for svc in world.services:
        ready = [e for e in svc.endpoints if e.ready]
        if not ready:
            detail = (
                f"its {len(svc.endpoints)} endpoints are not ready"
                if svc.endpoints
                else "no pod is selected by it or listed in its EndpointSlices"
            )
            yield Finding(
                NO_ENDPOINTS,
                Severity.ERROR,
                _service(svc),
                f"no ready endpoint: {detail}",
                "check the Service's selector and that its pods are Running and Ready",
            )
        elif not any(e.gpu for e in ready):
            yield Finding(
                NO_GPU_ENDPOINTS,
                Severity.WARNING,
                _service(svc),
                f"none of its {len(ready)} ready endpoints is GPU-backed: every request is "
                "served by fallback endpoints",
                "request a GPU (nvidia.com/gpu, amd.com/gpu or gpu.intel.com/*) in the "
                "model server's pods, or schedule them on nodes labelled "
                "nvidia.com/gpu.present=true",
            )


def _backing_pods(world: World, svc: InferenceService) -> list[Workload]:
    keys = sorted({e.pod_key for e in svc.endpoints if e.pod_key is not None})
    return [w for w in (world.workloads.get(k) for k in keys) if w is not None]


def _endpoints_without_sidecar(world: World) -> Iterator[Finding]:
    for svc in world.services:
        config = svc.config
        for workload in _backing_pods(world, svc):
            if workload.sidecar:
                continue
            if config.mtls is MtlsMode.STRICT:
                yield Finding(
                    ENDPOINT_WITHOUT_SIDECAR,
                    Severity.ERROR,
                    _pod(workload),
                    f"backs {_service(svc)}, which is mtls: strict, but has no sidecar: it "
                    "can only be reached in plaintext, so it gets no traffic",
                    "inject the sidecar (inferlane inject) and restart the pod",
                )
                continue
            lost = ["its traffic is plaintext (no mTLS)"]
            if config.rate_limit or config.max_concurrency is not None:
                lost.insert(0, "the Service's rate-limit and max-concurrency are not enforced")
            if config.critical_callers:
                lost.append("callers without a sidecar can send it critical requests")
            yield Finding(
                ENDPOINT_WITHOUT_SIDECAR,
                Severity.WARNING,
                _pod(workload),
                f"backs {_service(svc)} but has no sidecar: {'; '.join(lost)}",
                "inject the sidecar (inferlane inject) and restart the pod",
            )


def _strict_callers_without_sidecar(world: World) -> Iterator[Finding]:
    for svc in world.services:
        if svc.config.mtls is not MtlsMode.STRICT or not svc.config.critical_callers:
            continue
        for workload in world.workloads.values():
            if workload.sidecar or not any(
                ann.caller_matches(c, workload.namespace, workload.service_account)
                for c in svc.config.critical_callers
            ):
                continue
            yield Finding(
                STRICT_CALLER_WITHOUT_SIDECAR,
                Severity.ERROR,
                _pod(workload),
                f"is a critical caller of {_service(svc)}, which is mtls: strict, but has no "
                "sidecar: its plaintext requests are refused",
                "inject the sidecar (inferlane inject) into the caller, or set "
                f"{ann.MTLS}: permissive",
            )


def _concurrency_above_capacity(world: World) -> Iterator[Finding]:
    for svc in world.services:
        limit = svc.config.max_concurrency
        if limit is None:
            continue
        for workload in _backing_pods(world, svc):
            seqs = workload.max_num_seqs
            if seqs is None or limit <= seqs:
                continue
            yield Finding(
                CONCURRENCY_ABOVE_CAPACITY,
                Severity.WARNING,
                _pod(workload),
                f"runs --max-num-seqs {seqs}, below {_service(svc)}'s "
                f"{ann.MAX_CONCURRENCY} {limit}: the excess queues inside the model "
                "server, where classes are not told apart",
                f"set {ann.MAX_CONCURRENCY} to at most {seqs}, or raise --max-num-seqs",
            )


_CHECKS: tuple[Callable[[World], Iterator[Finding]], ...] = (
    _invalid_annotations,
    _ignored_input,
    _unknown_critical_callers,
    _endpoint_coverage,
    _endpoints_without_sidecar,
    _strict_callers_without_sidecar,
    _concurrency_above_capacity,
)


def summary(findings: Iterable[Finding]) -> Mapping[str, int]:
    counts = {"errors": 0, "warnings": 0}
    for finding in findings:
        counts["errors" if finding.severity is Severity.ERROR else "warnings"] += 1
    return counts
