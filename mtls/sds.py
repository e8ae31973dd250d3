"""SDS secrets: a workload's certificate and the trust bundle, under Istio's names.

Pure translation, no I/O: the xDS layer decides whose certificate to send (a proxy gets
the secrets of its own identity and no others) and when to renew it.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

from mtls.ca import IssuedCert

#: The workload's certificate chain and private key.
WORKLOAD_SECRET = "default"
#: The trust bundle peers are verified against.
ROOT_SECRET = "ROOTCA"
#: The names a proxy may ask for.
SECRET_NAMES: tuple[str, ...] = (WORKLOAD_SECRET, ROOT_SECRET)


def workload_secret(issued: IssuedCert) -> secret_pb2.Secret:
    """``default``: the chain (leaf and intermediates) and key, inline."""
    return secret_pb2.Secret(
        name=WORKLOAD_SECRET,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=issued.chain_pem),
            private_key=base_pb2.DataSource(inline_bytes=issued.key_pem),
        ),
    )


def root_secret(trust_bundle_pem: bytes) -> secret_pb2.Secret:
    """``ROOTCA``: the trusted roots, inline."""
    return secret_pb2.Secret(
        name=ROOT_SECRET,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=trust_bundle_pem),
        ),
    )


def secrets_for(issued: IssuedCert, trust_bundle_pem: bytes) -> list[secret_pb2.Secret]:
    """Both secrets for one workload identity: ``default`` then ``ROOTCA``."""
    return [workload_secret(issued), root_secret(trust_bundle_pem)]
