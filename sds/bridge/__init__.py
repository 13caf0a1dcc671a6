"""``sds run``: Workload API in, SDS out.

Configuration, the naming rules (``default``, ``ROOTCA``, ``ALL``, SPIFFE IDs),
upstream selection with failover, JWT-SVIDs, metrics, the admin endpoint, and
the composition root that owns every task (:mod:`sds.bridge.app`).
"""
