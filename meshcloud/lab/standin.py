"""A trivial stand-in for the rack daemon, so the lab can be tested on its own.

``python -m meshcloud.lab.standin --config daemon.yaml`` reads the same
config file as the real daemon (and refuses a weak secret the same way),
then serves, on the rack's lab address:

- ``GET /health`` on the API port: ``{"rack": ..., "site": ..., "standin": true}``;
- an echo server on the Raft port that holds every connection open (handy to
  check what a peer sees when this rack dies).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

from meshcloud.config import load_config
from meshcloud.core.errors import MeshcloudError


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while data := sock.recv(65536):
            sock.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _health_handler(body: bytes) -> type[BaseHTTPRequestHandler]:
    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/health":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Health


def _stop(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="meshcloud lab stand-in daemon")
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        cfg.read_secret()
    except MeshcloudError as exc:
        print(f"standin: {exc}", file=sys.stderr, flush=True)
        return 2
    signal.signal(signal.SIGTERM, _stop)
    addr = cfg.network.bind_address
    body = json.dumps({"rack": cfg.rack.name, "site": cfg.rack.site, "standin": True}).encode()
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.allow_reuse_address = True
    api = ThreadingHTTPServer((addr, cfg.network.api_port), _health_handler(body))
    echo = _EchoServer((addr, cfg.network.raft_port), _Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    print(
        f"standin: rack {cfg.rack.name} on {addr}: api {cfg.network.api_port},"
        f" echo {cfg.network.raft_port}",
        flush=True,
    )
    try:
        api.serve_forever()
    finally:
        api.server_close()
        echo.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
