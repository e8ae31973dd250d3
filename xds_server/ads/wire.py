"""Hand-encoded DiscoveryResponse and DeltaDiscoveryResponse messages.

A push of one resource to ten thousand streams must not build ten thousand protobuf
objects. Each resource is serialized once (``snapshot.Resource``) together with its
encoded ``Any`` and Delta ``Resource`` wrappers; a response is then a join of those byte
strings plus a few scalar fields. Protobuf's wire format allows fields in any order and
repeated fields to be concatenated, so the result parses exactly like the message
protobuf would have built (``tests/ads/test_wire.py`` checks that).
"""

from __future__ import annotations

from collections.abc import Iterable

_LEN = 2  # wire type: length-delimited


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def field_bytes(number: int, payload: bytes) -> bytes:
    """One length-delimited field: tag, length, payload."""
    return varint((number << 3) | _LEN) + varint(len(payload)) + payload


def field_str(number: int, value: str) -> bytes:
    return field_bytes(number, value.encode()) if value else b""


def encode_any(type_url: str, body: bytes) -> bytes:
    """``google.protobuf.Any``: type_url = 1, value = 2."""
    return field_str(1, type_url) + field_bytes(2, body)


def encode_delta_resource(name: str, version: str, any_bytes: bytes) -> bytes:
    """``envoy.service.discovery.v3.Resource``: version = 1, resource = 2, name = 3."""
    return field_str(1, version) + field_bytes(2, any_bytes) + field_str(3, name)


# DiscoveryResponse: version_info = 1, resources = 2, type_url = 4, nonce = 5.
def discovery_response(
    version_info: str, type_url: str, nonce: str, encoded_resources: Iterable[bytes]
) -> bytes:
    """``encoded_resources`` are already field-2 entries (``Resource.sotw_field``)."""
    return b"".join(
        (
            field_str(1, version_info),
            *encoded_resources,
            field_str(4, type_url),
            field_str(5, nonce),
        )
    )


# DeltaDiscoveryResponse: system_version_info = 1, resources = 2, type_url = 4,
# nonce = 5, removed_resources = 6.
def delta_discovery_response(
    system_version: str,
    type_url: str,
    nonce: str,
    encoded_resources: Iterable[bytes],
    removed: Iterable[str],
) -> bytes:
    """``encoded_resources`` are already field-2 entries (``Resource.delta_field``)."""
    return b"".join(
        (
            field_str(1, system_version),
            *encoded_resources,
            field_str(4, type_url),
            field_str(5, nonce),
            *(field_str(6, name) for name in removed),
        )
    )
