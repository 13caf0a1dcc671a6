"""``sds run``: Workload API in, SDS out.

Configuration, the naming rules (``default``, ``ROOTCA``, ``ALL``, SPIFFE IDs),
upstream selection with failover, JWT-SVIDs, metrics, the admin endpoint and its
pages (:mod:`sds.bridge.views`), the composition root that owns every task
(:mod:`sds.bridge.root`) and the command line (:mod:`sds.bridge.app`).
"""
