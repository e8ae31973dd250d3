"""Envoy bootstraps that subscribe to inferlane over ADS (``inferlane bootstrap``).

What Envoy needs, as checked against it: ``ads_config`` with GRPC or DELTA_GRPC and V3,
``set_node_on_first_message_only``, LDS and CDS from ADS, and, above all, an xDS cluster
with HTTP/2 enabled; without it ADS fails silently.

Over TLS the proxy verifies the control plane's certificate against the mesh root and its
DNS SAN against ``server_name``, and authenticates itself with a client certificate from
the mesh CA (the mutual-TLS port, 15011) or a service-account token (audience
``inferlane``) sent as ``authorization: Bearer`` on the ADS stream (the TLS port, 15012).
The token is written into the bootstrap, so a bootstrap made with one must be remade when
the token is replaced.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from mtls.tls_context import CONTROL_PLANE_NAME

XDS_CLUSTER = "xds-grpc"
_TYPE = "type.googleapis.com/"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_UPSTREAM_TLS = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


class BootstrapError(ValueError):
    pass


@dataclass(frozen=True)
class TlsSettings:
    """How the proxy reaches the xDS TLS port: the mesh root to verify the control plane
    with, and a client certificate and key (files on the proxy's disk) or a token."""

    ca_file: str
    cert_file: str = ""
    key_file: str = ""
    #: SNI, and the DNS SAN the control plane's certificate must carry.
    server_name: str = CONTROL_PLANE_NAME
    #: A Kubernetes service-account token for audience ``inferlane``.
    token: str = ""


@dataclass(frozen=True)
class BootstrapOptions:
    node_id: str
    xds_host: str = "127.0.0.1"
    xds_port: int = 15010
    delta: bool = False
    admin_port: int = 15000
    admin_address: str = "127.0.0.1"
    metadata: Mapping[str, Any] = field(default_factory=dict)
    cluster: str = "inferlane"
    tls: TlsSettings | None = None
    #: Seconds Envoy waits for a resource before going on without it (Envoy's default 15 s).
    initial_fetch_timeout: float = 15.0
    #: Local address the xDS connection is made from ("" lets the kernel choose).
    xds_source_address: str = ""


def parse_metadata(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a VALUE starting with ``{`` or ``[`` is read as JSON (LABELS)."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise BootstrapError(f"metadata {item!r} is not KEY=VALUE")
        if value[:1] in "{[":
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise BootstrapError(f"metadata {key}: bad JSON: {exc}") from None
        else:
            out[key] = value
    return out


def _xds_cluster(opts: BootstrapOptions) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": XDS_CLUSTER,
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": opts.xds_host,
                                        "port_value": opts.xds_port,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS: {
                "@type": _TYPE + _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }
    if opts.xds_source_address:
        cluster["upstream_bind_config"] = {
            "source_address": {"address": opts.xds_source_address, "port_value": 0}
        }
    if opts.tls is not None:
        common: dict[str, Any] = {
            "validation_context": {
                "trusted_ca": {"filename": opts.tls.ca_file},
                "match_typed_subject_alt_names": [
                    {"san_type": "DNS", "matcher": {"exact": opts.tls.server_name}}
                ],
            },
        }
        if opts.tls.cert_file:
            common["tls_certificates"] = [
                {
                    "certificate_chain": {"filename": opts.tls.cert_file},
                    "private_key": {"filename": opts.tls.key_file},
                }
            ]
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _TYPE + _UPSTREAM_TLS,
                "sni": opts.tls.server_name,
                "common_tls_context": common,
            },
        }
    return cluster


def _check_tls(tls: TlsSettings) -> None:
    if not tls.ca_file:
        raise BootstrapError("TLS needs the mesh root CA file")
    if bool(tls.cert_file) != bool(tls.key_file):
        raise BootstrapError("a client certificate needs both its certificate and key files")
    if not tls.cert_file and not tls.token:
        raise BootstrapError(
            "the TLS xDS port authenticates every proxy: give a client certificate and key, "
            "or a service-account token"
        )
    if any(c in tls.token for c in "\r\n"):
        raise BootstrapError("the token must be a single line")


def _grpc_service(opts: BootstrapOptions) -> dict[str, Any]:
    service: dict[str, Any] = {"envoy_grpc": {"cluster_name": XDS_CLUSTER}}
    if opts.tls is not None and opts.tls.token and not opts.tls.cert_file:
        service["initial_metadata"] = [
            {"key": "authorization", "value": f"Bearer {opts.tls.token}"}
        ]
    return service


def bootstrap(opts: BootstrapOptions) -> dict[str, Any]:
    """The bootstrap as a plain dict (dump it as YAML or JSON)."""
    if opts.xds_port <= 0 or opts.xds_port > 65535:
        raise BootstrapError(f"xDS port {opts.xds_port} is not a port number")
    if opts.tls is not None:
        _check_tls(opts.tls)
    config_source: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}
    if opts.initial_fetch_timeout != 15.0:
        config_source["initial_fetch_timeout"] = f"{opts.initial_fetch_timeout}s"
    return {
        "node": {
            "id": opts.node_id,
            "cluster": opts.cluster,
            "metadata": dict(opts.metadata),
        },
        "admin": {
            "address": {
                "socket_address": {"address": opts.admin_address, "port_value": opts.admin_port}
            }
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if opts.delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [_grpc_service(opts)],
            },
            "lds_config": config_source,
            "cds_config": config_source,
        },
        "static_resources": {"clusters": [_xds_cluster(opts)]},
    }


def bootstrap_yaml(opts: BootstrapOptions) -> str:
    return yaml.safe_dump(bootstrap(opts), sort_keys=False)
