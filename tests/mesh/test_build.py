"""build_world: services, endpoints (EndpointSlices or derived), the GPU rule, workloads."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.build import build_world, flatten_lists
from mesh.model import Endpoint, Priority, SourceError
from tests.mesh.objects import (
    endpoint_slice,
    gpu_limits,
    node,
    pod,
    service,
    slice_endpoint,
)


def addresses(endpoints: tuple[Endpoint, ...]) -> list[tuple[str, bool, bool]]:
    return [(e.address, e.gpu, e.ready) for e in endpoints]


def test_only_enabled_services_become_inference_services() -> None:
    world = build_world(
        [
            service("llama"),
            service("plain", annotations={}),
            service("off", annotations={"inferlane.io/enabled": "false"}),
        ]
    )
    assert [s.name for s in world.services] == ["llama"]
    assert world.source_errors == ()


def test_an_invalid_enabled_value_is_a_source_error_naming_the_service() -> None:
    world = build_world([service("llama", annotations={"inferlane.io/enabled": "yes"})])
    assert world.services == ()
    (error,) = world.source_errors
    assert error.source == "Service default/llama"
    assert "inferlane.io/enabled" in error.message


def test_annotation_errors_are_kept_on_the_service() -> None:
    world = build_world(
        [
            service(
                "llama",
                annotations={"inferlane.io/enabled": "true", "inferlane.io/timeout": "x"},
                uid="u-1",
            )
        ]
    )
    (svc,) = world.services
    assert [e.annotation for e in svc.errors] == ["inferlane.io/timeout"]
    assert svc.config.timeout_for(Priority.CRITICAL) == 300.0
    assert svc.uid == "u-1"
    assert svc.hostname == "llama.default.svc.cluster.local"


@pytest.mark.parametrize(
    ("resources", "gpu"),
    [
        (gpu_limits("nvidia.com/gpu", 1), True),
        (gpu_limits("nvidia.com/gpu", "2"), True),
        (gpu_limits("amd.com/gpu", 1), True),
        (gpu_limits("gpu.intel.com/i915", 1), True),
        (gpu_limits("gpu.intel.com/xe", "1"), True),
        ({"requests": {"nvidia.com/gpu": 1}}, True),
        (gpu_limits("nvidia.com/gpu", 0), False),
        (gpu_limits("nvidia.com/gpu", "0"), False),
        ({"requests": {"cpu": "8", "memory": "16Gi"}}, False),
        (gpu_limits("nvidia.com/mig-1g.5gb", 1), False),
        (None, False),
    ],
)
def test_gpu_rule_resources(resources: dict[str, Any] | None, gpu: bool) -> None:
    world = build_world(
        [service("llama"), pod("p", labels={"app": "llama"}, ip="10.0.0.1", resources=resources)]
    )
    assert world.services[0].endpoints[0].gpu is gpu
    assert world.workload("default", "p") is not None
    assert world.workloads[("default", "p")].gpu is gpu


def test_gpu_rule_counts_any_container_but_not_init_containers() -> None:
    gpu_sidecar = pod("a", labels={"app": "llama"}, ip="10.0.0.1")
    gpu_sidecar["spec"]["containers"].append(
        {"name": "second", "resources": gpu_limits("amd.com/gpu", 1)}
    )
    init_only = pod("b", labels={"app": "llama"}, ip="10.0.0.2")
    init_only["spec"]["initContainers"] = [
        {"name": "init", "resources": gpu_limits("nvidia.com/gpu", 1)}
    ]
    world = build_world([service("llama"), gpu_sidecar, init_only])
    assert addresses(world.services[0].endpoints) == [
        ("10.0.0.1", True, True),
        ("10.0.0.2", False, True),
    ]


def test_gpu_rule_node_label() -> None:
    world = build_world(
        [
            service("llama"),
            node("gpu-node", gpu=True),
            node("cpu-node"),
            pod("a", labels={"app": "llama"}, ip="10.0.0.1", node="gpu-node"),
            pod("b", labels={"app": "llama"}, ip="10.0.0.2", node="cpu-node"),
            pod("c", labels={"app": "llama"}, ip="10.0.0.3", node="unknown-node"),
        ]
    )
    assert addresses(world.services[0].endpoints) == [
        ("10.0.0.1", True, True),
        ("10.0.0.2", False, True),
        ("10.0.0.3", False, True),
    ]
    assert world.workloads[("default", "a")].gpu


def test_derived_endpoints_follow_the_endpointslice_controller() -> None:
    world = build_world(
        [
            service(
                "llama",
                ports=[
                    {"name": "http", "port": 80, "targetPort": "web"},
                    {"name": "metrics", "port": 9090},
                ],
            ),
            pod(
                "ready",
                labels={"app": "llama", "tier": "x"},
                ip="10.0.0.1",
                ports=[{"name": "web", "containerPort": 8000}],
            ),
            pod("not-ready", labels={"app": "llama"}, ip="10.0.0.2", ready=False),
            pod("no-ip", labels={"app": "llama"}),
            pod("done", labels={"app": "llama"}, ip="10.0.0.4", phase="Succeeded"),
            pod("other-app", labels={"app": "other"}, ip="10.0.0.5"),
            pod("other-ns", namespace="prod", labels={"app": "llama"}, ip="10.0.0.6"),
        ]
    )
    (svc,) = world.services
    got = [(e.service_port, e.address, e.port, e.ready, e.pod_name) for e in svc.endpoints]
    assert got == [
        # The named target port resolves per pod; the pod without it gets no endpoint.
        (80, "10.0.0.1", 8000, True, "ready"),
        (9090, "10.0.0.1", 9090, True, "ready"),
        (9090, "10.0.0.2", 9090, False, "not-ready"),
    ]
    assert svc.endpoints_for(80) == svc.endpoints[:1]


def test_terminating_pods_are_not_ready() -> None:
    leaving = pod("leaving", labels={"app": "llama"}, ip="10.0.0.1")
    leaving["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    world = build_world([service("llama"), leaving])
    assert not world.services[0].endpoints[0].ready
    assert not world.workloads[("default", "leaving")].ready


def test_a_service_without_selector_and_slices_has_no_endpoints() -> None:
    world = build_world([service("llama", selector={}), pod("p", labels={}, ip="10.0.0.1")])
    assert world.services[0].endpoints == ()


def test_endpointslices_win_over_derivation() -> None:
    world = build_world(
        [
            service("llama", ports=[{"name": "http", "port": 80, "targetPort": 8000}]),
            node("gpu-node", gpu=True),
            pod("a", labels={"app": "llama"}, ip="10.0.0.1", resources=gpu_limits()),
            pod("ignored", labels={"app": "llama"}, ip="10.0.0.9"),
            endpoint_slice(
                "llama-abc",
                "llama",
                [
                    slice_endpoint("10.0.0.1", pod_name="a"),
                    slice_endpoint("10.0.0.2", ready=False),
                    slice_endpoint("10.0.0.3", ready=None, node="gpu-node"),
                ],
            ),
            endpoint_slice("llama-def", "llama", [slice_endpoint("10.0.0.4")]),
        ]
    )
    (svc,) = world.services
    got = [(e.address, e.port, e.service_port, e.ready, e.gpu, e.pod_name) for e in svc.endpoints]
    assert got == [
        ("10.0.0.1", 8000, 80, True, True, "a"),  # GPU through the targetRef Pod
        ("10.0.0.2", 8000, 80, False, False, ""),
        ("10.0.0.3", 8000, 80, True, True, ""),  # nil ready means ready; GPU node
        ("10.0.0.4", 8000, 80, True, False, ""),
    ]


def test_endpointslice_ports_resolve_by_name() -> None:
    world = build_world(
        [
            service(
                "llama",
                ports=[
                    {"name": "http", "port": 80, "targetPort": "web"},
                    {"name": "grpc", "port": 81, "targetPort": 9000},
                ],
            ),
            endpoint_slice(
                "s",
                "llama",
                [slice_endpoint("10.0.0.1")],
                ports=[
                    {"name": "http", "port": 8000},
                    {"name": "grpc", "port": 9000},
                    {"name": "unknown", "port": 1234},
                ],
            ),
        ]
    )
    got = [(e.service_port, e.port) for e in world.services[0].endpoints]
    assert got == [(80, 8000), (81, 9000)]


def test_an_empty_endpointslice_means_no_endpoints_not_derived() -> None:
    world = build_world(
        [
            service("llama"),
            pod("p", labels={"app": "llama"}, ip="10.0.0.1"),
            endpoint_slice("s", "llama", []),
        ]
    )
    assert world.services[0].endpoints == ()


def test_duplicate_endpoints_across_slices_merge() -> None:
    world = build_world(
        [
            service("llama"),
            endpoint_slice("a", "llama", [slice_endpoint("10.0.0.1", ready=False)]),
            endpoint_slice("b", "llama", [slice_endpoint("10.0.0.1", ready=True)]),
        ]
    )
    assert addresses(world.services[0].endpoints) == [("10.0.0.1", False, True)]


def test_workloads_carry_identity() -> None:
    world = build_world(
        [
            pod(
                "chat-0",
                labels={"app": "chat"},
                ip="10.0.0.7",
                node="n1",
                service_account="chat-frontend",
            ),
            pod("anon", ip="10.0.0.8", ready=False),
        ]
    )
    chat = world.workload("default", "chat-0")
    assert chat is not None
    assert (chat.service_account, chat.ip, chat.node_name, chat.ready) == (
        "chat-frontend",
        "10.0.0.7",
        "n1",
        True,
    )
    assert dict(chat.labels) == {"app": "chat"}
    anon = world.workloads[("default", "anon")]
    assert anon.service_account == "default"
    assert not anon.ready


@pytest.mark.parametrize(
    ("mangle", "source"),
    [
        (lambda o: o.pop("metadata"), "Service without a name"),
        (lambda o: o["metadata"].pop("name"), "Service without a name"),
        (lambda o: o.__setitem__("spec", ["not", "a", "map"]), "Service default/llama"),
        (lambda o: o["spec"].__setitem__("ports", "8000"), "Service default/llama"),
        (lambda o: o["spec"]["ports"][0].__setitem__("port", 70000), "Service default/llama"),
        (lambda o: o["spec"]["ports"][0].__setitem__("port", True), "Service default/llama"),
        (lambda o: o["metadata"].__setitem__("annotations", "x"), "Service default/llama"),
        (lambda o: o["metadata"].__setitem__("labels", {"a": {"b": 1}}), "Service default/llama"),
        (lambda o: o["metadata"].__setitem__("namespace", 5), "Service default/llama"),
    ],
)
def test_malformed_services_are_skipped_with_a_source_error(mangle: Any, source: str) -> None:
    bad = service("llama")
    mangle(bad)
    world = build_world([bad, service("good")])
    assert [s.name for s in world.services] == ["good"]
    (error,) = world.source_errors
    assert error.source == source
    assert "skipped" in error.message


def test_malformed_pods_slices_and_non_objects_do_not_raise() -> None:
    bad_pod = pod("p", labels={"app": "llama"}, ip="10.0.0.1")
    bad_pod["spec"]["containers"] = {"oops": 1}
    bad_slice = endpoint_slice("s", "llama", [{"addresses": "10.0.0.1"}])
    world = build_world(
        [service("llama"), bad_pod, bad_slice, "text", 42, None, {"metadata": {}}, {"kind": 5}]
    )
    assert world.workloads == {}
    sources = [e.source for e in world.source_errors]
    assert "Pod default/p" in sources
    assert "EndpointSlice default/s" in sources
    # str, int, None, and objects without a kind (two of them, one message).
    assert sources.count("input") == 4
    # The Service survives, with endpoints derived (its slice was skipped).
    assert world.services[0].endpoints == ()


def test_duplicates_keep_the_first_and_report() -> None:
    world = build_world([service("llama", uid="first"), service("llama", uid="second")])
    assert world.services[0].uid == "first"
    assert world.source_errors == (
        SourceError("Service default/llama", "defined more than once; the first is used"),
    )


def test_other_kinds_are_ignored_and_lists_are_flattened() -> None:
    listed = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [service("llama"), {"apiVersion": "apps/v1", "kind": "Deployment"}],
    }
    typed = {
        "kind": "PodList",
        "items": [{"metadata": {"name": "p", "labels": {"app": "llama"}}, "status": {}}],
    }
    world = build_world([listed, typed, {"kind": "ConfigMap", "metadata": {"name": "x"}}])
    assert [s.name for s in world.services] == ["llama"]
    assert ("default", "p") in world.workloads
    assert world.source_errors == ()
    assert [o["kind"] for o in flatten_lists([typed]) if isinstance(o, dict)] == ["Pod"]


def test_the_same_objects_in_any_order_give_an_equal_world() -> None:
    objects: list[Any] = [
        service("llama"),
        service("embedder"),
        node("gpu", gpu=True),
        *[pod(f"p{i}", labels={"app": "llama"}, ip=f"10.0.0.{i}", node="gpu") for i in range(1, 6)],
        endpoint_slice("e", "embedder", [slice_endpoint("10.0.1.1")]),
        {"kind": "Service", "metadata": {}},
    ]
    first = build_world(copy.deepcopy(objects))
    for seed in range(5):
        shuffled = copy.deepcopy(objects)
        random.Random(seed).shuffle(shuffled)
        assert build_world(shuffled) == first


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_json, max_size=4), st.sampled_from(["metadata", "spec", "status", "ports"]))
def test_fuzz_build_world_never_raises(junk: list[Any], field: str) -> None:
    objects: list[Any] = [service("llama"), pod("p", labels={"app": "llama"}, ip="10.0.0.1")]
    for i, value in enumerate(junk):
        victim = copy.deepcopy(objects[i % 2])
        victim["metadata"] = {**victim["metadata"], "name": f"junk{i}"}
        victim[field] = value
        objects.append(victim)
    world = build_world(objects)
    assert world == build_world(copy.deepcopy(objects))
