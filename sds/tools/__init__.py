"""Commands around the bridge: ``inspect``, ``wait``, ``envoy-bootstrap``, ``demo``, ``version``.

Each is a client of the packages below it; none is imported by them.
"""
