#!/usr/bin/env python3
"""Runs a WSGI app with bjoern on the socket drover passes at fd 3 (bjoern
binds its own socket otherwise), for the peers scenario.

    usage: bjoern_worker.py module:app

bjoern sends no READY=1 (run it with ready = "spawn") and has no graceful
stop: SIGTERM ends it at once. It is one thread: one request at a time.
"""

import importlib
import socket
import sys

import bjoern


def main():
    module, _, attr = sys.argv[1].partition(":")
    app = getattr(importlib.import_module(module), attr or "app")
    sock = socket.socket(fileno=3)
    sock.setblocking(False)
    bjoern.server_run(sock, app)


if __name__ == "__main__":
    main()
