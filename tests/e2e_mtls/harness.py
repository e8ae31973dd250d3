"""Shared pieces of the mesh mTLS tests: manifests, a control plane, sidecars, TLS clients.

Pod IPs are loopback addresses of each module's own (``127.0.5N.x``), so modules never
clash with each other, with ``tests/e2e`` (127.0.3N.x) or with the demo. A backend listens
on an ephemeral port of its pod IP; the manifests name that port as the Pod's container
port ``http``, which the Service's ``targetPort`` names.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.envoy import Envoy
from bench.testbed import free_ports
from mesh.manifests import ManifestSource
from mtls.ca import CertificateAuthority, IssuedCert
from tests.e2e import harness as e2e
from tests.mesh.objects import pod, service
from xds_server.ads.debounce import DebounceSettings
from xds_server.app import ControlPlane, ServeSettings
from xds_server.auth.settings import SecuritySettings
from xds_server.sidecar.bootstrap import BootstrapOptions, TlsSettings

TD = "cluster.local"
SERVICE_PORT = 8000
PORT_NAME = "http"
XFCC = "x-forwarded-client-cert"


def spiffe(service_account: str, namespace: str = "default") -> str:
    return f"spiffe://{TD}/ns/{namespace}/sa/{service_account}"


# --- manifests ---------------------------------------------------------------------------


def inference_service(name: str, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    return service(
        name,
        annotations={"inferlane.io/enabled": "true", **(annotations or {})},
        ports=({"name": PORT_NAME, "port": SERVICE_PORT, "targetPort": PORT_NAME},),
    )


def workload_pod(
    name: str,
    *,
    ip: str,
    service_account: str,
    app: str = "",
    port: int = 0,
    sidecar: bool = False,
) -> dict[str, Any]:
    """A Pod at ``ip`` running as ``service_account``; with ``port`` it serves ``app``;
    with ``sidecar`` its manifest declares the sidecar, as ``inferlane inject`` writes it."""
    ports = ({"name": PORT_NAME, "containerPort": port, "protocol": "TCP"},) if port else ()
    return pod(
        name,
        labels={"app": app or name},
        ip=ip,
        service_account=service_account,
        resources={"limits": {"nvidia.com/gpu": 1}} if port else None,
        ports=ports,
        sidecar=sidecar,
    )


def llama_pod(name: str, ip: str, port: int, *, sidecar: bool = False) -> dict[str, Any]:
    """A model server Pod of ``llama`` (service account ``llama``) serving on ip:port."""
    return workload_pod(
        name, ip=ip, service_account="llama", app="llama", port=port, sidecar=sidecar
    )


def write_manifests(path: Path, objects: Iterable[Mapping[str, Any]]) -> None:
    """One ``kind: List`` document, written to a temporary name and renamed into place."""
    document = {"apiVersion": "v1", "kind": "List", "items": [dict(o) for o in objects]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(document, sort_keys=False))
    os.replace(tmp, path)


# --- the control plane -------------------------------------------------------------------


def settings(
    ca_dir: Path,
    *,
    cert_ttl: timedelta = timedelta(hours=24),
    xds_port: int = 0,
) -> ServeSettings:
    return ServeSettings(
        host="127.0.0.1",
        xds_port=xds_port,
        xds_tls_port=0,
        xds_mtls_port=0,
        admin_port=0,
        debounce=DebounceSettings(quiet=0.02, max_delay=0.2),
        shutdown_grace=0.2,
        security=SecuritySettings(ca_dir=ca_dir, cert_ttl=cert_ttl),
    )


def control_plane(
    manifest: Path, serve: ServeSettings, **kwargs: Any
) -> contextlib.AbstractAsyncContextManager[ControlPlane]:
    """A ControlPlane on ``manifest``, in this event loop; yields once its world is loaded."""
    return e2e.control_plane(ManifestSource(manifest, poll_interval=0.05), serve, **kwargs)


# --- sidecars ----------------------------------------------------------------------------


@dataclass
class Sidecar:
    """A sidecar's identity and ports; ``envoy`` once started."""

    ip: str
    pod_name: str
    namespace: str = "default"
    outbound_port: int = 0
    inbound_port: int = 0
    #: Where the inbound sidecar reaches its workload: by default the pod's own IP, since
    #: every pod here shares this host's loopback.
    workload_address: str = ""
    envoy: Envoy | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        outbound, inbound = free_ports(self.ip, 2)
        self.outbound_port = self.outbound_port or outbound
        self.inbound_port = self.inbound_port or inbound

    @property
    def node_id(self) -> str:
        return (
            f"sidecar~{self.ip}~{self.pod_name}.{self.namespace}~{self.namespace}.svc.cluster.local"
        )

    def metadata(self, service_account: str = "") -> dict[str, str]:
        meta = {
            "NAMESPACE": self.namespace,
            "INFERLANE_BIND_ADDRESS": self.ip,
            "INFERLANE_WORKLOAD_ADDRESS": self.workload_address or self.ip,
            "INFERLANE_OUTBOUND_PORT": str(self.outbound_port),
            "INFERLANE_INBOUND_PORT": str(self.inbound_port),
        }
        if service_account:
            meta["SERVICE_ACCOUNT"] = service_account
        return meta

    def options(
        self,
        xds_port: int,
        *,
        service_account: str = "",
        tls: TlsSettings | None = None,
        source_address: str = "",
        delta: bool = False,
    ) -> BootstrapOptions:
        return BootstrapOptions(
            node_id=self.node_id,
            xds_port=xds_port,
            delta=delta,
            admin_port=0,
            metadata=self.metadata(service_account),
            tls=tls,
            xds_source_address=source_address,
        )


@contextlib.asynccontextmanager
async def running(opts: BootstrapOptions) -> AsyncIterator[Envoy]:
    envoy = Envoy(opts)
    try:
        yield await envoy.start()
    finally:
        await envoy.stop()


async def certs(envoy: Envoy) -> dict[str, Any]:
    """Envoy's ``/certs``: ``{"chain": [(serial, [uri SANs])], "ca": [serials]}``."""
    data = await envoy.admin_json("/certs")
    chain: list[tuple[str, list[str]]] = []
    roots: list[str] = []
    for entry in data.get("certificates", []):
        for cert in entry.get("cert_chain", []):
            sans = [s["uri"] for s in cert.get("subject_alt_names", []) if "uri" in s]
            chain.append((cert["serial_number"], sans))
        roots.extend(c["serial_number"] for c in entry.get("ca_cert", []))
    return {"chain": chain, "ca": roots}


async def own_serials(envoy: Envoy, spiffe_id: str) -> set[str]:
    return {serial for serial, sans in (await certs(envoy))["chain"] if spiffe_id in sans}


async def listener_handshakes(envoy: Envoy) -> int:
    """TLS handshakes Envoy's listeners completed (``listener.*.ssl.handshake``)."""
    stats = await envoy.stats("ssl.handshake")
    return sum(v for k, v in stats.items() if k.startswith("listener.") and k.endswith("handshake"))


# --- clients -----------------------------------------------------------------------------


class Http:
    """Plain and mTLS HTTP requests, each on a fresh connection."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def get(
        self,
        host: str,
        port: int,
        authority: str,
        *,
        headers: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> tuple[int, str]:
        """(status, body); raises aiohttp/ssl errors when there is no HTTP answer."""
        scheme = "https" if tls is not None else "http"
        connector = aiohttp.TCPConnector(ssl=tls if tls is not None else False, force_close=True)
        async with (
            aiohttp.ClientSession(timeout=self.timeout, connector=connector) as session,
            session.get(
                f"{scheme}://{host}:{port}/v1/completions",
                headers={"Host": authority, **(headers or {})},
            ) as resp,
        ):
            return resp.status, await resp.text()

    async def refused(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> bool:
        """True when a request gets no HTTP answer at all (connection closed or reset)."""
        try:
            await self.get(host, port, f"llama:{SERVICE_PORT}", tls=tls)
        except (TimeoutError, aiohttp.ClientError, ssl.SSLError, OSError):
            return True
        return False


def client_tls(
    ca: CertificateAuthority, issued: IssuedCert | None, directory: Path
) -> ssl.SSLContext:
    """A TLS client context trusting the mesh root, presenting ``issued`` if given.

    The server's identity is a SPIFFE URI, not a host name, so only the chain is checked.
    """
    context = ssl.create_default_context(cadata=ca.trust_bundle_pem.decode())
    context.check_hostname = False
    if issued is not None:
        directory.mkdir(parents=True, exist_ok=True)
        chain = directory / f"{issued.serial:x}.crt"
        key = directory / f"{issued.serial:x}.key"
        chain.write_bytes(issued.chain_pem)
        key.write_bytes(issued.key_pem)
        context.load_cert_chain(chain, key)
    return context


def header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None
