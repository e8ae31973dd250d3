"""Rate limiting: Envoy building blocks, global rules and counters, and adaptive limits.

- :mod:`ratelimit.local`: the local_ratelimit and ratelimit HTTP filters, per-route token
  buckets with exact fractional rates, route ``rate_limits`` actions, the RLS cluster.
- :mod:`ratelimit.rules`: envoyproxy/ratelimit's descriptor rules, built from the world.
- :mod:`ratelimit.counters`: fixed-window counters in memory or Redis, with a failure mode.
- :mod:`ratelimit.adaptive`: the per-endpoint AIMD controller and per-class limits.
- :mod:`ratelimit.scrape`: reading vLLM's saturation gauges from ``/metrics``.

The gRPC service that serves the rules lives in ``xds_server.rls.service``: this package never
imports gRPC.
"""
