#!/usr/bin/env python3
"""A test worker that reports what drover gave it.

It serves HTTP on the first inherited socket (fd 3) with the standard library
only, and answers:
  /          hello from pid N
  /probe     JSON: pid, process group, environment, open fds, signal state,
             stdin, parent-death signal, and libsystemd's sd_listen_fds()
  /orphan    leaves a grandchild that outlives its parent (re-parented to drover)
  /orphans?n=N  N grandchildren, each orphaned at once
  /sleep?ms=N
  /exit      answers, then exits with status 0 (announcing nothing)
Options: --notify (send READY=1), --exit N (exit with N at once),
         --ignore-term (SIGTERM ignored), --probe-file F (write /probe's JSON to F
         at start).
"""
import ctypes
import ctypes.util
import http.server
import json
import os
import signal
import socket
import sys
import time
import urllib.parse


def notify(msg):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(msg.encode(), path)


def proc_status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split()[1]
    return None


def pdeathsig():
    libc = ctypes.CDLL(None, use_errno=True)
    sig = ctypes.c_int(0)
    libc.prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
    return sig.value


def sd_listen_fds():
    name = ctypes.util.find_library("systemd") or "libsystemd.so.0"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    # unset_environment=0: leave the variables for the rest of the probe.
    return lib.sd_listen_fds(0)


def probe():
    fds = {}
    for fd in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    keys = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "DROVER_WORKER_ID",
            "DROVER_GENERATION", "DROVER_GRACEFUL_TIMEOUT", "PROBE_EXTRA", "PROBE_REMOVED")
    umask = os.umask(0)
    os.umask(umask)
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": ",".join(str(g) for g in sorted(os.getgroups())),
        "umask": oct(umask),
        "cwd": os.getcwd(),
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "pgid": os.getpgid(0),
        "env": {k: os.environ[k] for k in keys if k in os.environ},
        "fds": fds,
        "sig_blocked": proc_status("SigBlk"),
        "sig_ignored": proc_status("SigIgn"),
        "stdin": os.readlink("/proc/self/fd/0"),
        "pdeathsig": pdeathsig(),
        "sd_listen_fds": sd_listen_fds(),
    }


# Taken before the server opens anything, so the fds are drover's alone.
PROBE = probe()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, body, ctype="text/plain"):
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Worker-Pid", str(os.getpid()))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path == "/probe":
            self.reply(json.dumps(PROBE), "application/json")
        elif url.path == "/orphan":
            pid = os.fork()
            if pid == 0:
                if os.fork() == 0:
                    time.sleep(0.3)  # outlives its parent, then exits: a zombie unless reaped
                os._exit(0)
            os.waitpid(pid, 0)
            self.reply("orphaned\n")
        elif url.path == "/orphans":
            # Many short-lived grandchildren, each orphaned at once.
            n = int(query.get("n", ["1"])[0])
            for _ in range(n):
                pid = os.fork()
                if pid == 0:
                    if os.fork() == 0:
                        os._exit(0)
                    os._exit(0)
                os.waitpid(pid, 0)
            self.reply(f"orphaned {n}\n")
        elif url.path == "/exit":
            # Ends itself with status 0 and announces nothing (a worker that
            # recycles itself without STOPPING=1).
            self.reply("exiting\n")
            os._exit(0)
        elif url.path == "/sleep":
            time.sleep(int(query.get("ms", ["0"])[0]) / 1000)
            self.reply("slept\n")
        else:
            self.reply(f"hello from pid {os.getpid()}\n")


def main():
    args = sys.argv[1:]
    if "--exit" in args:
        sys.exit(int(args[args.index("--exit") + 1]))
    if "--probe-file" in args:
        with open(args[args.index("--probe-file") + 1], "w") as f:
            json.dump(PROBE, f)
    if "--ignore-term" in args:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=3)
    server = http.server.ThreadingHTTPServer(sock.getsockname(), Handler, bind_and_activate=False)
    server.socket = sock
    server.daemon_threads = True
    if "--notify" in args:
        notify("READY=1\nSTATUS=probe serving")
    server.serve_forever()


if __name__ == "__main__":
    main()
