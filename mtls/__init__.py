"""Mesh mTLS: the CA, SPIFFE workload certificates, SDS secrets and TLS transport sockets.

- :mod:`mtls.ca`: :class:`~mtls.ca.CertificateAuthority` (a root created under ``--ca-dir``,
  or a root or intermediate loaded from files or a cert-manager Secret), SPIFFE IDs,
  client verification and the :class:`~mtls.ca.MtlsError` tree.
- :mod:`mtls.store`: one CA shared by all replicas through a Kubernetes Secret.
- :mod:`mtls.rotation`: one certificate per identity, renewed at half-life with jitter.
- :mod:`mtls.sds`: the ``default`` and ``ROOTCA`` secrets (pure).
- :mod:`mtls.tls_context`: upstream and downstream transport sockets that fetch those
  secrets over ADS (pure).
"""
