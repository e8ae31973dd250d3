"""Small protobuf helpers the builders share."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import config_source_pb2
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message


def pack(message: Message) -> any_pb2.Any:
    """``Any`` holding ``message``, serialized deterministically (stable map order), so the
    same config always gives the same bytes and the same resource version."""
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    return packed


def ads_config_source() -> Any:
    """``{ads: {}, resource_api_version: V3}``: fetch over the proxy's ADS stream."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value
