"""The SPIFFE Workload API client: the bridge's upstream side.

The only reader of Workload API protobuf messages: it turns them into
:mod:`sds.spiffe` values and maps gRPC failures to :mod:`sds.errors` in one table.
"""
