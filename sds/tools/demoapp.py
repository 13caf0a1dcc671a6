"""The demo's application: plain HTTP on loopback, no TLS, no SPIFFE library.

It stands for the app nobody can change. It only reads two headers its
Envoy sidecar adds: ``x-forwarded-client-cert`` (the caller's SPIFFE ID,
proven by mTLS) and ``x-jwt-payload`` (the JWT-SVID's claims, verified by
Envoy's ``jwt_authn``). Run as ``python -m sds.tools.demoapp PORT``.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["main"]

_URI = re.compile(r"URI=([^;,]+)")


class _Handler(BaseHTTPRequestHandler):
    server_version = "demo-app/1"

    def do_GET(self) -> None:
        xfcc = self.headers.get("x-forwarded-client-cert", "")
        match = _URI.search(xfcc)
        jwt_subject = None
        payload = self.headers.get("x-jwt-payload")
        if payload:
            try:
                raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
                jwt_subject = json.loads(raw).get("sub")
            except ValueError:
                jwt_subject = "unreadable"
        body = json.dumps(
            {
                "message": "hello from an app that knows nothing about TLS",
                "caller": match.group(1) if match else None,
                "jwt_subject": jwt_subject,
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    """Serve on 127.0.0.1:PORT until killed."""
    args = sys.argv[1:] if argv is None else argv
    server = ThreadingHTTPServer(("127.0.0.1", int(args[0])), _Handler)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
