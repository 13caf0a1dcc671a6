"""``sds envoy-bootstrap``: generate a complete Envoy v3 sidecar bootstrap that uses our SDS.

The generated Envoy gets every certificate and trust bundle from the bridge
(``sds run``) over a Unix socket, so no key ever touches its config file:

* an **inbound** mTLS listener (``--inbound``) in front of the local app. It
  presents ``default``, requires a client certificate and validates it with a
  bridge *policy* (``--policy-name``, allowing ``--allow`` IDs), so callers
  outside the policy fail in the TLS handshake. With ``--protocol http`` an
  RBAC filter checks the same IDs per request and the caller's SPIFFE ID is
  passed to the app in ``x-forwarded-client-cert`` (``URI=...``).
* **outbound** plaintext listeners on loopback (``--outbound``) that the app
  calls; Envoy dials the remote with mTLS, presents ``default`` and accepts
  only a server presenting one of the ``--expect`` IDs: Istio's pattern, a
  ``combined_validation_context`` whose static part holds URI SAN matchers
  and whose SDS part is the expected trust domain's bundle (``spiffe://td``,
  or ``ALL`` when the IDs span trust domains). Envoy verified (1.36, 1.40):
  the matchers apply together with the SPIFFE certificate validator.

Envoy's **admin** listens on a Unix socket (``--admin-socket``, default
``/run/envoy/admin.sock``, mode 0600), so only Envoy's uid can reach it: on
loopback TCP any local user could ``POST /quitquitquit``. ``--admin-port N``
puts it on ``127.0.0.1:N`` instead, on request and with a warning.

The package, by job: :mod:`.options` (what to generate, flag value parsers),
:mod:`.model` (pure functions from :class:`BootstrapOptions` to Envoy config
dicts), :mod:`.render` (YAML and header text), :mod:`.command`
(``add_arguments``/``run``: flag checks and file writing). User documentation,
including why each timeout has its value: ``envoy/README.md``.
"""

from __future__ import annotations

from sds.tools.bootstrap.command import add_arguments, options_from_args, run
from sds.tools.bootstrap.model import (
    bridge_policy,
    build_bootstrap,
    inbound_validation_name,
    outbound_validation_name,
)
from sds.tools.bootstrap.options import (
    DEFAULT_ADMIN_SOCKET,
    DEFAULT_POLICY_NAME,
    BootstrapOptions,
    Inbound,
    Outbound,
    parse_inbound,
    parse_outbound,
    parse_peer_id,
)
from sds.tools.bootstrap.render import (
    SNIPPET_MARKER,
    command_line,
    render_bootstrap,
    render_bridge_snippet,
    to_envoy_yaml,
)

__all__ = [
    "DEFAULT_ADMIN_SOCKET",
    "DEFAULT_POLICY_NAME",
    "SNIPPET_MARKER",
    "BootstrapOptions",
    "Inbound",
    "Outbound",
    "add_arguments",
    "bridge_policy",
    "build_bootstrap",
    "command_line",
    "inbound_validation_name",
    "options_from_args",
    "outbound_validation_name",
    "parse_inbound",
    "parse_outbound",
    "parse_peer_id",
    "render_bootstrap",
    "render_bridge_snippet",
    "run",
    "to_envoy_yaml",
]
