#!/usr/bin/env python3
"""Runs a worker with no supervisor: binds HOST:PORT, puts the listening socket
at fd 3, sets LISTEN_FDS=1 and LISTEN_PID to its own pid, and execs the worker
(exec keeps the pid), as systemd-socket-activate would.

    usage: socket_exec.py HOST:PORT [--backlog N] -- COMMAND [ARG...]
"""

import os
import socket
import sys


def main():
    args = sys.argv[1:]
    if "--" not in args:
        sys.exit(__doc__)
    sep = args.index("--")
    opts, cmd = args[:sep], args[sep + 1:]
    host, port = opts[0].rsplit(":", 1)
    backlog = int(opts[opts.index("--backlog") + 1]) if "--backlog" in opts else 2048
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    s.listen(backlog)
    if s.fileno() != 3:
        os.dup2(s.fileno(), 3)  # inheritable by default
        s.close()
    else:
        os.set_inheritable(3, True)
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="http")
    env.pop("NOTIFY_SOCKET", None)
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
