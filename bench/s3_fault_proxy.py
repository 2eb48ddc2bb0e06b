"""A fault-injecting HTTP proxy for an S3 endpoint: 503 SlowDown, 500 InternalError, connection resets,
latency spikes and refusals (403) at seeded rates, per request, for the keys a rule matches.

It stands between the pipeline (s3fs/botocore, unpatched) and a real S3 server (moto in the tests), so
every retry path that a throttling or flaky object store exercises runs for real. Used by the fault
tests and ``bench/faults.py``; also runnable by hand:

    python bench/s3_fault_proxy.py --upstream http://127.0.0.1:5000 --port 5001 --rate 503=0.2 --rate reset=0.05
"""

from __future__ import annotations

import argparse
import http.client
import random
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("503", "500", "reset", "latency", "403")
_BODIES = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "AccessDenied", "Access Denied"),
}
# Headers that describe one hop's connection, not the message: never forwarded.
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class Rule:
    """Faults for requests whose path (``/bucket/key``) matches ``pattern`` and whose method is in
    ``methods`` (None: any). ``rates`` maps a kind in KINDS to its probability per request; ``first``
    fails the first ``n`` requests to each path with one kind (an outage of one object, then recovery)."""
    pattern: str = ".*"
    rates: dict[str, float] = field(default_factory=dict)
    methods: tuple[str, ...] | None = None
    latency_s: float = 0.5
    first: tuple[str, int] | None = None

    def matches(self, method: str, path: str) -> bool:
        return (self.methods is None or method in self.methods) and re.search(self.pattern, path) is not None


class FaultProxy:
    """``with FaultProxy(upstream, rules, seed) as p:`` then point s3fs at ``p.url``. ``p.counts`` has
    the faults injected by kind, ``p.requests`` the requests seen."""

    def __init__(self, upstream: str, rules: list[Rule] | None = None, seed: int = 0, port: int = 0,
                 drop_headers: tuple[str, ...] = ()):
        self.upstream = urlsplit(upstream)
        # e.g. ("If-None-Match",): a store that ignores conditional writes, as some S3-compatible ones do
        self.drop = {h.lower() for h in drop_headers}
        self.rules = list(rules or [])
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {k: 0 for k in KINDS}
        self.requests = 0
        self.enabled = True
        self.seen: dict[str, int] = {}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="s3-fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def injected(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _pick(self, method: str, path: str) -> str | None:
        with self.lock:
            self.requests += 1
            if not self.enabled:
                return None
            for rule in self.rules:
                if not rule.matches(method, path):
                    continue
                if rule.first:
                    self.seen[path] = self.seen.get(path, 0) + 1
                    if self.seen[path] <= rule.first[1]:
                        self.counts[rule.first[0]] += 1
                        return rule.first[0]
                for kind in KINDS:
                    if self.rng.random() < rule.rates.get(kind, 0.0):
                        self.counts[kind] += 1
                        return kind
            return None

    def _latency(self, method: str, path: str) -> float:
        return next((r.latency_s for r in self.rules if r.matches(method, path)), 0.5)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        path = h.path.split("?", 1)[0]
        fault = self._pick(h.command, path)
        if fault == "reset":
            # RST instead of FIN: the client sees "connection reset by peer" mid-request.
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            h.connection.close()
            return
        if fault in _BODIES:
            status, code, message = _BODIES[fault]
            payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                       f"<Message>{message}</Message><RequestId>fault</RequestId></Error>").encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(payload) if h.command != "HEAD" else 0))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(payload)
            return
        if fault == "latency":
            time.sleep(self._latency(h.command, path))
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP and k.lower() not in self.drop}
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            h.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP and k.lower() != "content-length":
                    h.send_header(k, v)
            # A HEAD response states the object's length without a body.
            h.send_header("Content-Length", resp.getheader("Content-Length", "0") if h.command == "HEAD"
                          else str(len(data)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
        finally:
            conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="S3 endpoint to forward to, e.g. http://127.0.0.1:5000")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pattern", default=".*", help="Regex on /bucket/key: which requests may fail.")
    ap.add_argument("--rate", action="append", default=[], metavar="KIND=P", help=f"KIND in {KINDS}; repeatable.")
    args = ap.parse_args()
    rates = {k: float(v) for k, v in (r.split("=", 1) for r in args.rate)}
    with FaultProxy(args.upstream, [Rule(args.pattern, rates)], args.seed, args.port) as p:
        print(f"proxy on {p.url} -> {args.upstream}", flush=True)
        try:
            while True:
                time.sleep(5)
                print(f"requests={p.requests} injected={p.counts}", flush=True)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
