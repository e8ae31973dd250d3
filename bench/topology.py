"""The benchmark mesh: who runs where, with which class mix, and the manifests that say so.

Pure definitions, no I/O but writing the manifests: :mod:`bench.testbed` runs them.

- **Pods** of the ``llama`` Service (port 8000): four GPU pods (simulated Llama-3.1-8B on
  an A100-40GB, :mod:`bench.gpu_sim`), one of them 1.5 times slower (an older GPU), and a
  CPU fallback pod, which inferlane sends traffic to only when no GPU pod is healthy.
- **Callers**: four workloads with sidecars and one gateway, each with its own share of
  the traffic and its own class mix. Every request streams.

The addresses (127.0.10.x) are loopback aliases that stand in for pod IPs; they are this
mesh's own, apart from ``examples/cluster``'s and the other benchmarks'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import yaml

from bench.gpu_sim import Policy, SimConfig
from bench.load import OUTPUT_LENGTHS, PROMPT_LENGTHS, ApiKind, Caller, LengthDist

NAMESPACE: Final = "default"
SERVICE: Final = "llama"
SERVICE_HOST: Final = "llama.default.svc.cluster.local"
SERVICE_PORT: Final = 8000
#: The gateway's service account; it may send critical (it fronts the public chat app).
GATEWAY_ACCOUNT: Final = "ingress-gateway"


@dataclass(frozen=True)
class Pod:
    name: str
    ip: str
    gpu: bool
    #: How much slower than the calibrated GPU its steps are.
    slowdown: float = 1.0


@dataclass(frozen=True)
class CallerPod:
    """A calling workload (or the gateway) and the traffic it sends."""

    caller: Caller
    ip: str
    service_account: str
    gateway: bool = False

    @property
    def name(self) -> str:
        return self.caller.name


PODS: Final = (
    Pod("llama-gpu-0", "127.0.10.11", gpu=True),
    Pod("llama-gpu-1", "127.0.10.12", gpu=True),
    Pod("llama-gpu-2", "127.0.10.13", gpu=True),
    Pod("llama-gpu-3", "127.0.10.14", gpu=True, slowdown=1.5),
    Pod("llama-cpu-0", "127.0.10.15", gpu=False),
)

#: The callers, their shares of the total rate and their mixes. Together: about 21 %
#: critical, 32 % standard and 47 % sheddable.
CALLERS: Final = (
    CallerPod(
        Caller("chat-frontend", 0.20, {"critical": 0.6, "standard": 0.4}),
        "127.0.10.21",
        "chat-frontend",
    ),
    CallerPod(
        Caller("search-api", 0.20, {"critical": 0.3, "standard": 0.5, "sheddable": 0.2}),
        "127.0.10.22",
        "search-api",
    ),
    CallerPod(Caller("batch-worker", 0.25, {"sheddable": 1.0}), "127.0.10.23", "batch-worker"),
    CallerPod(
        Caller("eval-runner", 0.15, {"standard": 0.3, "sheddable": 0.7}),
        "127.0.10.24",
        "eval-runner",
    ),
    CallerPod(
        Caller(
            "ingress-gateway",
            0.20,
            {"critical": 0.15, "standard": 0.45, "sheddable": 0.40},
            ApiKind.CHAT,
        ),
        "127.0.10.30",
        GATEWAY_ACCOUNT,
        gateway=True,
    ),
)


@dataclass(frozen=True)
class Knobs:
    """What a run varies: the Service's annotations and the pods' vLLM settings."""

    #: ``inferlane.io/max-concurrency`` (None: not set). What SPEC suggests for vLLM: its
    #: ``max_num_seqs``, the GPU pods' 32.
    max_concurrency: int | None = 32
    #: ``inferlane.io/adaptive: "true"``.
    adaptive: bool = False
    #: ``inferlane.io/rate-limit`` (e.g. ``sheddable=5``), or None.
    rate_limit: str | None = None
    #: vLLM's ``--scheduling-policy`` on every pod. ``priority`` also sets the Service's
    #: ``inferlane.io/scheduling-policy: priority``, so each pod's sidecar writes the
    #: class it serves as vLLM's ``priority``.
    scheduling_policy: Policy = Policy.FCFS
    #: Callers write vLLM's ``priority`` into each body from its class themselves: what a
    #: user without inferlane could do (the baselines get it too). Needs the ``priority``
    #: policy on the pods (vLLM refuses the field otherwise).
    body_priority: bool = False
    #: vLLM's ``--max-num-seqs`` on the GPU pods.
    max_num_seqs: int = 32
    #: Every pod's steps take this many times longer than on the calibrated GPU, so that
    #: this machine's cores keep up with the token stream (all times scale with it).
    slowdown: float = 2.0
    #: Pods send ORCA load reports on streamed responses too (vLLM sends them on whole
    #: responses only), to evaluate load-aware balancing on a streaming workload.
    orca_on_streams: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheduling_policy", Policy(self.scheduling_policy))
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.body_priority and self.scheduling_policy is not Policy.PRIORITY:
            raise ValueError("body priority needs the priority scheduling policy on the pods")
        if self.max_num_seqs < 1 or not self.slowdown > 0:
            raise ValueError("max_num_seqs must be at least 1 and slowdown positive")

    def label(self) -> str:
        """A short name for a row of the trade-off table."""
        parts = [f"max-concurrency {self.max_concurrency or '-'}"]
        if self.adaptive:
            parts.append("adaptive")
        if self.rate_limit:
            parts.append(f"rate-limit {self.rate_limit}")
        parts.append(f"vLLM {self.scheduling_policy.value}")
        if self.body_priority:
            parts[-1] += " (callers write the class)"
        parts.append(f"max-num-seqs {self.max_num_seqs}")
        if self.orca_on_streams:
            parts.append("ORCA on streams")
        return ", ".join(parts)


@dataclass(frozen=True)
class Topology:
    pods: tuple[Pod, ...] = PODS
    callers: tuple[CallerPod, ...] = CALLERS
    prompt_lengths: LengthDist = PROMPT_LENGTHS
    output_lengths: LengthDist = OUTPUT_LENGTHS
    annotations: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def gpu_pods(self) -> tuple[Pod, ...]:
        return tuple(p for p in self.pods if p.gpu)

    def sim_configs(self, knobs: Knobs) -> list[SimConfig]:
        """Each pod's simulator settings under ``knobs``."""
        out = []
        for pod in self.pods:
            common: dict[str, Any] = {
                "scheduling_policy": knobs.scheduling_policy,
                "slowdown": knobs.slowdown * pod.slowdown,
                "orca_on_streams": knobs.orca_on_streams,
            }
            if pod.gpu:
                out.append(
                    SimConfig.gpu_pod(
                        pod.name, pod.ip, SERVICE_PORT, max_num_seqs=knobs.max_num_seqs, **common
                    )
                )
            else:
                out.append(SimConfig.cpu_pod(pod.name, pod.ip, SERVICE_PORT, **common))
        return out

    def critical_callers(self) -> list[str]:
        return [
            f"{NAMESPACE}/{c.service_account}"
            for c in self.callers
            if c.caller.mix.get("critical", 0) > 0
        ]

    def service_annotations(self, knobs: Knobs) -> dict[str, str]:
        annotations = {
            "inferlane.io/enabled": "true",
            "inferlane.io/default-priority": "standard",
            "inferlane.io/critical-callers": ",".join(self.critical_callers()),
            # Streams are long at this slowdown; the deadline is the client's.
            "inferlane.io/timeout": "critical=600s,standard=600s,sheddable=600s",
        }
        if knobs.max_concurrency is not None:
            annotations["inferlane.io/max-concurrency"] = str(knobs.max_concurrency)
        if knobs.adaptive:
            annotations["inferlane.io/adaptive"] = "true"
        if knobs.rate_limit:
            annotations["inferlane.io/rate-limit"] = knobs.rate_limit
        if knobs.scheduling_policy is Policy.PRIORITY:
            annotations["inferlane.io/scheduling-policy"] = "priority"
        return {**annotations, **self.annotations}

    def manifests(self, knobs: Knobs) -> list[dict[str, Any]]:
        """The Service, its pods, the callers' pods and service accounts, the GPU node."""
        docs: list[dict[str, Any]] = [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": SERVICE,
                    "namespace": NAMESPACE,
                    "annotations": self.service_annotations(knobs),
                },
                "spec": {
                    "selector": {"app": SERVICE},
                    "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": SERVICE_PORT}],
                },
            }
        ]
        accounts = {SERVICE} | {c.service_account for c in self.callers}
        docs += [account_document(name) for name in sorted(accounts)]
        for pod in self.pods:
            gpu = {"nvidia.com/gpu": 1} if pod.gpu else {}
            docs.append(
                pod_document(
                    pod.name,
                    pod.ip,
                    account=SERVICE,
                    labels={"app": SERVICE},
                    port=SERVICE_PORT,
                    resources=gpu,
                )
            )
        for c in self.callers:
            docs.append(
                pod_document(
                    f"{c.name}-0",
                    c.ip,
                    account=c.service_account,
                    labels={"app": c.name},
                    port=None,
                    resources={},
                )
            )
        return docs

    def write_manifests(self, path: Path, knobs: Knobs) -> Path:
        return write_documents(path, self.manifests(knobs))

    def with_callers(self, callers: Sequence[CallerPod]) -> Topology:
        return dataclasses.replace(self, callers=tuple(callers))


def write_documents(path: Path, documents: Sequence[Mapping[str, Any]]) -> Path:
    """Write YAML documents atomically (a control plane may be reading the file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump_all([dict(d) for d in documents], sort_keys=False))
    tmp.replace(path)
    return path


def account_document(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": NAMESPACE},
    }


def pod_document(
    name: str,
    ip: str,
    *,
    account: str,
    labels: Mapping[str, str],
    port: int | None,
    resources: Mapping[str, int],
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "example.com/app:1"}
    if port is not None:
        container["ports"] = [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    if resources:
        container["resources"] = {"requests": dict(resources), "limits": dict(resources)}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": dict(labels)},
        "spec": {"serviceAccountName": account, "containers": [container]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
