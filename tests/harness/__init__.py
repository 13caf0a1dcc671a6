"""Test harness shared by the tests and the benchmarks: real peers, strict fakes, material.

Envoy (``envoy``), the bridge and provider as processes (``stack``), the fake
Workload API (``fake_workload_api``), certificate makers (``material``), raw
HTTP/2 clients (``h2raw``, ``h2async``), SPIRE, Go peers and container images.
Nothing here is a test; ``bench/`` imports these modules, never a ``test_*``.
"""
