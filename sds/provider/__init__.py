"""The embedded SPIFFE Workload API provider (``sds workload-api``).

A single-host Workload API server on a Unix socket, backed by the local CA
(:mod:`sds.provider.ca`). Callers are attested from the kernel's peer credentials and
matched against ``workload_identity`` documents (the Teleport resource shape).

* :mod:`sds.provider.identities` parses identities files and federation bundles;
* :mod:`sds.provider.service` is the gRPC service and :class:`WorkloadApiProvider`;
* :mod:`sds.provider.root` is the composition root (:class:`ProviderApp`: start and
  shutdown order, task ownership, the crash policy);
* :mod:`sds.provider.app` is the command line.

This package module imports nothing, so ``sds --help`` stays cheap.
"""
