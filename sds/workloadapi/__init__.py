"""The SPIFFE Workload API client: the bridge's upstream side.

By job: :mod:`.address` (endpoint addresses and the security header, Workload
Endpoint s.3-4), :mod:`.client` (the only reader of Workload API protobuf
messages: it turns them into :mod:`sds.spiffe` values and maps gRPC failures to
:mod:`sds.errors` in one table), :mod:`.watcher` (the self-healing watch
``sds run`` serves from), :mod:`.backoff` and :mod:`.socketwatch` (its
reconnect schedule and socket-reappearance trigger).
"""
