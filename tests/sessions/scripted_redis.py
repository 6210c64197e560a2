"""A scripted stand-in for Redis, run as a process of its own (a test's event loop may be
held by a busy poll, and a thread of the test's own process would wait for the GIL):
``python scripted_redis.py CONTROL``, which prints its port. It answers the connection's
handshake with ``+OK`` for each command, and each commit script call (EVALSHA) with
``:1`` (every commit applied) as the JSON file CONTROL says at that moment:

- ``first``, ``rest``: seconds before the first byte, then before the rest;
- ``close``: close the connection instead of answering;
- ``reset_after``: reset the connection this many seconds after answering (an idle
  connection that dies);
- ``stray_after``: send a reply nobody asked for this many seconds after answering.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
from pathlib import Path


def _serve(conn: socket.socket, control: Path) -> None:
    with conn:
        while data := conn.recv(1 << 16):
            if b"EVALSHA" not in data:
                conn.sendall(b"+OK\r\n" * max(1, data.count(b"*")))
                continue
            script = json.loads(control.read_text())
            if script.get("close"):
                return
            time.sleep(script.get("first", 0))
            conn.sendall(b":")
            time.sleep(script.get("rest", 0))
            conn.sendall(b"1\r\n")
            if "stray_after" in script:
                time.sleep(script["stray_after"])
                conn.sendall(b":2\r\n")
            if "reset_after" in script:
                time.sleep(script["reset_after"])
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return


def main(control: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve, args=(conn, control), daemon=True).start()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
