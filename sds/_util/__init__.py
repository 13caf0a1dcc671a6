"""Small mechanisms with no SPIFFE or Envoy knowledge: logging, kernel peer checks, files, YAML.

The lowest layer: it may import only the standard library, third-party
packages and :mod:`sds.errors`.
"""
