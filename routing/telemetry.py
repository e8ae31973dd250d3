"""Per-request stats of outbound traffic, as the client saw it, per class cluster.

Envoy's own cluster stats count upstream attempts (a retried request counts twice) and
time whole responses. An inference dashboard also wants what the client saw once per
request, and the time to the first token. So the outbound and gateway listeners carry
Envoy's stats access logger (``envoy.access_loggers.stats``), which records, for each
request as it ends:

- ``inferlane.requests`` (counter), tags ``cluster`` and ``code``: the response code
  the client got, local replies (429, 503) included;
- ``inferlane.request.duration`` (histogram, ms), tag ``cluster``: the whole request;
- ``inferlane.request.ttft`` (histogram, ms), tag ``cluster``: from the request's first
  byte to the first byte of the response *body*, i.e. the first token of a streamed
  completion (a model server sends its headers before generating).

In Prometheus (``/stats/prometheus``) they are ``envoy_inferlane_requests``,
``envoy_inferlane_request_duration_bucket`` and ``envoy_inferlane_request_ttft_bucket``.
The ``cluster`` tag is the class cluster (``outbound|PORT|CLASS|HOST``), so every series
is per Service and class, with a cardinality the config bounds: a client's header never
becomes a tag value. Envoy 1.40 wants the logger's ``stat_prefix`` (deprecated there in
favour of a field the protos this build uses do not have yet), so it logs one
deprecation warning per listener update.
"""

from __future__ import annotations

from typing import Any, Final

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.extensions.access_loggers.stats.v3 import stats_pb2

from routing.protos import pack

ACCESS_LOGGER: Final = "envoy.access_loggers.stats"
#: Prefixed to each stat's name below: ``inferlane.requests`` and so on.
STAT_PREFIX: Final = "inferlane"
REQUESTS: Final = "requests"
DURATION: Final = "request.duration"
TTFT: Final = "request.ttft"

_CLUSTER_TAG: Final = stats_pb2.Config.Tag(name="cluster", value_format="%UPSTREAM_CLUSTER%")
_CODE_TAG: Final = stats_pb2.Config.Tag(name="code", value_format="%RESPONSE_CODE%")


def _histogram(name: str, value_format: str) -> Any:
    return stats_pb2.Config.Histogram(
        stat=stats_pb2.Config.Stat(name=name, tags=[_CLUSTER_TAG]),
        unit=stats_pb2.Config.Histogram.Milliseconds,
        value_format=value_format,
    )


def request_stats_log() -> Any:
    """The access log an outbound or gateway HTTP connection manager carries."""
    config = stats_pb2.Config(
        stat_prefix=STAT_PREFIX,
        counters=[
            stats_pb2.Config.Counter(
                stat=stats_pb2.Config.Stat(name=REQUESTS, tags=[_CLUSTER_TAG, _CODE_TAG]),
                value_fixed={"value": 1},
            )
        ],
        histograms=[
            _histogram(DURATION, "%DURATION%"),
            _histogram(TTFT, "%COMMON_DURATION(DS_RX_BEG:US_RX_BODY_BEG:ms)%"),
        ],
    )
    return accesslog_pb2.AccessLog(name=ACCESS_LOGGER, typed_config=pack(config))
