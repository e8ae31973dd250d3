"""``inferlane serve --workers N``: streams served from N processes on one port.

One process, the primary, holds everything that must be one: the source and the world,
the debouncer, the translation, the workload certificates, the adaptive loop, the admin
surface. N worker processes accept the plaintext xDS port's streams on a shared
``SO_REUSEPORT`` socket, so the kernel spreads connections among them; each serves its
streams with the ordinary ADS engine (:class:`~xds_server.ads.server.XdsServer`) from
snapshots the primary translated and serialized once (``hub.py`` ships them, ``worker.py``
serves them). See ``docs/performance.md`` for why the primary translates for all.
"""
