"""Envoy's Secret Discovery Service (xDS v3): secret specs, the versioned cache, the gRPC service.

The only package that builds or reads Envoy messages. It knows nothing of the
Workload API: it serves whatever :class:`sds.xds.cache.SecretCache` holds.
"""
