"""Test harness shared by the tests and the benchmarks: real peers, strict fakes, material.

Envoy (``envoy``), the bridge and provider as processes (``stack``), the fake
Workload API (``fake_workload_api``), certificate makers (``material``), raw
HTTP/2 clients (``h2raw``, ``h2async``), SPIRE, Go peers and container images,
and what more than one test module uses: deploy manifests (``manifests``),
Workload API clients and servers (``workload_client``, ``upstream_server``,
``watcher``), the in-process SDS server (``sds_server``), fuzzing (``grpc_fuzz``).
Nothing here is a test; the tests and ``bench/`` import these modules, never a
``test_*`` one.
"""
