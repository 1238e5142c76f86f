"""A real HTTP server for the remote-shard tests, run as its own process (so a test can SIGKILL it):
serves the files of ROOT, with range requests, and misbehaves on purpose by path prefix.

    python tests/datamodules/shard_server.py ROOT [--port N] [--log FILE]

prints its port on the first line of stdout, then serves until killed. Paths:

    /ok/NAME        the file, whole (a `Range: bytes=N-` request gets 206 and the rest)
    /truncate/NAME  every response announces the whole length but sends half of it and closes
    /flaky/NAME     the first request for NAME is cut off at half; later ones are whole
    /stall/NAME     sends half, then sends nothing more (sleeps 60 s) with the connection open
    /stallfirst/NAME  the first request for NAME stalls before its first byte; later ones are whole
    anything else   404

Each request is logged to --log as one line: "METHOD PATH RANGE".
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

STALL_S = 60


class Handler(BaseHTTPRequestHandler):
    root: Path
    log_file: Path | None
    seen: set[str] = set()
    lock = threading.Lock()

    def log_message(self, *args) -> None:  # quiet: the log file records what the tests need
        pass

    def first_time(self, name: str) -> bool:
        with self.lock:
            first = name not in self.seen
            self.seen.add(name)
            return first

    def do_GET(self) -> None:
        rng = self.headers.get("Range") or "-"
        if self.log_file is not None:
            with self.lock, self.log_file.open("a") as f:
                f.write(f"GET {self.path} {rng}\n")
        parts = self.path.lstrip("/").split("/", 1)
        mode, name = (parts + [""])[:2]
        path = self.root / name.split("?", 1)[0]
        if mode not in ("ok", "truncate", "flaky", "stall", "stallfirst") or not path.is_file():
            self.send_error(404, "Not Found")
            return
        data = path.read_bytes()
        start = int(rng.split("=")[1].split("-")[0]) if rng.startswith("bytes=") else 0
        if mode == "stallfirst" and self.first_time(self.path):
            time.sleep(STALL_S)
            return
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", f'"{len(data)}-{path.stat().st_mtime_ns}"')
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = mode in ("truncate", "stall") or (mode == "flaky" and self.first_time(self.path))
        if not cut:
            self.wfile.write(body)
            return
        self.wfile.write(body[: max(1, len(body) // 2)])
        self.wfile.flush()
        if mode == "stall":
            time.sleep(STALL_S)
        self.close_connection = True


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--log", default=None)
    a = p.parse_args()
    Handler.root = Path(a.root)
    Handler.log_file = Path(a.log) if a.log else None
    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    print(server.server_address[1], flush=True)
    sys.stdout.close()
    server.serve_forever()


if __name__ == "__main__":
    main()
