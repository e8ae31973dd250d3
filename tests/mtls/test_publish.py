"""mtls.publish: the root certificate's ConfigMap in every mesh namespace, kept current,
written without replicas fighting; against the fake API server (the real wire protocol:
GET, POST, PUT with resourceVersion preconditions)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from datetime import timedelta
from typing import Any

import pytest

from bench.wait import eventually
from mesh.build import build_world
from mesh.kube import KubernetesSource
from mesh.model import World
from mtls.ca import CertificateAuthority, utcnow
from mtls.publish import (
    CONFIGMAP_NAME,
    LABELS,
    ROOT_CERT_KEY,
    RootCertPublisher,
    bundle_rank,
    mesh_namespaces,
)
from tests.e2e.harness import control_plane, loopback_settings
from tests.mesh.fake_apiserver import FakeApiServer, core_v1
from tests.mesh.objects import pod, service


@pytest.fixture(scope="module")
def old_ca() -> CertificateAuthority:
    return CertificateAuthority.generate(clock=lambda: utcnow() - timedelta(days=30))


@pytest.fixture(scope="module")
def new_ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


def mesh_world() -> World:
    return build_world(
        [
            service("llama", namespace="models"),
            pod("chat-0", namespace="apps", sidecar=True),
            pod("web-0", namespace="web"),  # no sidecar, no enabled Service: not in the mesh
            service("plain", namespace="other", annotations={}),
        ]
    )


def published(fake: FakeApiServer) -> dict[str, str]:
    return {
        o["metadata"]["namespace"]: o["data"][ROOT_CERT_KEY]
        for o in fake.objects("ConfigMap")
        if o["metadata"]["name"] == CONFIGMAP_NAME
    }


def test_mesh_namespaces_are_those_with_enabled_services_or_sidecars() -> None:
    assert mesh_namespaces(mesh_world()) == {"models", "apps"}


def test_bundles_rank_newest_root_first(
    old_ca: CertificateAuthority, new_ca: CertificateAuthority
) -> None:
    old, new = old_ca.trust_bundle_pem.decode(), new_ca.trust_bundle_pem.decode()
    assert bundle_rank(new) > bundle_rank(old)  # type: ignore[operator]
    assert bundle_rank(old + new) > bundle_rank(old)  # type: ignore[operator]
    assert bundle_rank("not a certificate") is None


async def test_publishes_once_per_mesh_namespace_and_then_only_reads(
    new_ca: CertificateAuthority,
) -> None:
    async with core_v1() as (fake, core):
        publisher = RootCertPublisher(core, lambda: new_ca.trust_bundle_pem)
        publisher.set_world(mesh_world())
        assert await publisher.reconcile() == 2
        root = new_ca.trust_bundle_pem.decode()
        assert published(fake) == {"apps": root, "models": root}
        (one, _) = fake.objects("ConfigMap")
        assert one["metadata"]["labels"] == dict(LABELS)
        # Known-current namespaces are not even read again until the resync.
        before = len(fake.requests)
        assert await publisher.reconcile() == 0
        assert len(fake.requests) == before
        # A namespace that joins the mesh is done on the next pass.
        publisher.set_world(build_world([*mesh_objects(), service("embed", namespace="new")]))
        assert await publisher.reconcile() == 1
        assert set(published(fake)) == {"apps", "models", "new"}


def mesh_objects() -> list[dict[str, Any]]:
    return [service("llama", namespace="models"), pod("chat-0", namespace="apps", sidecar=True)]


async def test_a_deleted_or_edited_configmap_comes_back_at_resync(
    new_ca: CertificateAuthority,
) -> None:
    async with core_v1() as (fake, core):
        publisher = RootCertPublisher(core, lambda: new_ca.trust_bundle_pem, resync_s=0.2)
        publisher.set_world(mesh_world())
        await publisher.reconcile()
        root = new_ca.trust_bundle_pem.decode()
        await fake.delete("ConfigMap", "apps", CONFIGMAP_NAME)
        (models,) = [o for o in fake.objects("ConfigMap") if o["metadata"]["namespace"] == "models"]
        models["data"][ROOT_CERT_KEY] = "tampered"
        await fake.put({"kind": "ConfigMap", **models})
        task = asyncio.create_task(publisher.run())

        async def restored() -> bool:
            return published(fake) == {"apps": root, "models": root}

        try:
            await eventually(restored, timeout=10, what="both ConfigMaps restored")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_replicas_with_different_roots_converge_on_the_newest_without_fighting(
    old_ca: CertificateAuthority, new_ca: CertificateAuthority
) -> None:
    """During a CA rotation one replica may still hold the old root: the newest bundle
    wins, and the replica with the old one leaves it alone instead of writing it back."""
    async with core_v1() as (fake, core):
        old = RootCertPublisher(core, lambda: old_ca.trust_bundle_pem)
        new = RootCertPublisher(core, lambda: new_ca.trust_bundle_pem)
        for replica in (old, new):
            replica.set_world(mesh_world())
        for _ in range(3):  # passes interleaved, each after a resync
            for replica in (old, new):
                replica.root_changed()
                await replica.reconcile()
        root = new_ca.trust_bundle_pem.decode()
        assert published(fake) == {"apps": root, "models": root}
        assert (old.writes, new.writes) == (2, 2)  # old created; new updated; then nothing


async def test_a_concurrent_write_is_detected_and_read_again(
    new_ca: CertificateAuthority, old_ca: CertificateAuthority
) -> None:
    async with core_v1() as (fake, core):
        publisher = RootCertPublisher(core, lambda: new_ca.trust_bundle_pem)
        publisher.set_world(build_world([service("llama", namespace="models")]))
        await fake.put(
            {
                "kind": "ConfigMap",
                "metadata": {"name": CONFIGMAP_NAME, "namespace": "models"},
                "data": {ROOT_CERT_KEY: old_ca.trust_bundle_pem.decode()},
            }
        )
        real_read = core.read_namespaced_config_map

        async def read_then_someone_writes(name: str, namespace: str) -> Any:
            found = await real_read(name, namespace)
            (stored,) = fake.objects("ConfigMap")
            await fake.put({"kind": "ConfigMap", **stored})  # a new resourceVersion
            return found

        core.read_namespaced_config_map = read_then_someone_writes
        assert await publisher.reconcile() == 0  # 409: nothing written, not marked current
        core.read_namespaced_config_map = real_read
        assert await publisher.reconcile() == 1
        assert published(fake) == {"models": new_ca.trust_bundle_pem.decode()}
        puts = [r for r in fake.requests if r.method == "PUT"]
        assert len(puts) == 2


async def test_refusals_are_logged_once_and_retried(
    new_ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    async with core_v1() as (fake, core):
        publisher = RootCertPublisher(core, lambda: new_ca.trust_bundle_pem)
        publisher.set_world(build_world([service("llama", namespace="models")]))
        caplog.set_level(logging.WARNING, logger="mtls.publish")
        for _ in range(2):
            fake.fail_next(1, status=403)
            publisher.root_changed()
            assert await publisher.reconcile() == 0
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1
        assert "RBAC" in warnings[0] and "models" in warnings[0]
        publisher.root_changed()
        assert await publisher.reconcile() == 1


async def test_serve_with_kubernetes_publishes_its_root() -> None:
    """``inferlane serve --kubernetes`` wires the publisher to the world it serves."""
    async with core_v1() as (fake, core):
        await fake.put(service("llama", namespace="models"))
        await fake.put(pod("chat-0", namespace="apps", sidecar=True))
        api = core.api_client
        settings = dataclasses.replace(loopback_settings(), kubernetes=True)
        source = KubernetesSource(api, post_events=False)
        async with control_plane(source, settings, kube_api=api) as plane:
            assert plane.secrets is not None
            root = plane.secrets.trust_bundle_pem.decode()

            async def both() -> bool:
                return published(fake) == {"apps": root, "models": root}

            await eventually(both, timeout=15, what="the root in both mesh namespaces")
            # A namespace that joins the mesh gets it too.
            await fake.put(service("embed", namespace="new"))

            async def joined() -> bool:
                return published(fake).get("new") == root

            await eventually(joined, timeout=15, what="the root in the new namespace")
