"""Stand-in for hashicorp/http-echo in tests (no registry here): ``-listen=ADDR -text=TEXT``.

Answers every GET with TEXT and a newline, like the real image; plain HTTP,
no TLS, nothing else.
"""

import http.server
import sys


def main() -> None:
    options = dict(arg.lstrip("-").split("=", 1) for arg in sys.argv[1:])
    host, _, port = options.get("listen", ":5678").rpartition(":")
    body = (options.get("text", "") + "\n").encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    http.server.ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler).serve_forever()


if __name__ == "__main__":
    main()
