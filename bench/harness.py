"""Plumbing of the benchmark harness: the subjects (how each system is started),
processes and their output, HTTP probes, wrk and the load generator.

Everything here talks to 127.0.0.1 only.
"""

import errno
import json
import os
import re
import select
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENV = BENCH / ".venv"
VENV_PY = VENV / "bin" / "python"
# bench/run --rev REV builds a committed revision into bench/.build instead.
BIN_DIR = Path(os.environ.get("BENCH_BIN_DIR") or ROOT / "target" / "release")
DROVER = BIN_DIR / "drover"
HELLO = BIN_DIR / "hello"
LOADGEN = BENCH / "loadgen" / "target" / "release" / "drover-bench-loadgen"
APPS = BENCH / "apps"
# drover_wsgi, installed into the bench venv from workers/python by bench/run.
WSGI_WORKER = VENV / "bin" / "drover-wsgi"
EXAMPLES = ROOT / "workers" / "python" / "examples"
TO_LISTEN_FDS = BENCH / "adapters" / "fd_to_listen_fds.sh"
SOCKET_EXEC = BENCH / "adapters" / "socket_exec.py"

# The request the start-up probe sends: long enough that a worker busy with it
# leaves the next connection to another worker, short enough not to matter.
PROBE_SLEEP_MS = 5

# The line each reference worker prints once it accepts (after READY=1).
WORKER_READY = r"^(?:hello|drover_wsgi)\[(\d+)\]: ready"


class Unavailable(Exception):
    """A subject or scenario that cannot run today; the message says why."""


def now():
    return time.monotonic()


def ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 3)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# /proc


def proc_stat(pid):
    """(state, ppid, pgid, starttime) of pid, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rfind(")") + 2:].split()
    return rest[0], int(rest[1]), int(rest[2]), int(rest[19])


def alive(pid):
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def process_table():
    """pid -> ppid of every live process."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st and st[0] not in ("Z", "X"):
                table[int(name)] = st[1]
    return table


def descendants(root):
    """Live descendants of root (not root itself)."""
    table = process_table()
    kids = {}
    for pid, ppid in table.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def status_fields(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except OSError:
        pass
    return out


def context_switches(pid):
    """Voluntary + involuntary context switches of every thread of pid."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for t in tasks:
        st = status_fields(f"{pid}/task/{t}")
        total += int(st.get("voluntary_ctxt_switches", 0)) + int(st.get("nonvoluntary_ctxt_switches", 0))
    return total


def schedstat(pid):
    """(CPU time ns, time runnable but waiting for a CPU ns, times put on a
    CPU) so far, summed over every thread of pid, from schedstat; None when
    pid is gone."""
    total = [0, 0, 0]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                for i, v in enumerate(f.read().split()[:3]):
                    total[i] += int(v)
        except (OSError, ValueError):
            pass
    return tuple(total)


def cpu_ns(pid):
    """CPU time (ns) used so far by every thread of pid, from schedstat."""
    st = schedstat(pid)
    return st[0] if st else None


def kernel_ns(pid):
    """Kernel-mode CPU time (ns) used so far by every thread of pid, from
    the stime of /proc/PID/task/TID/stat: clock ticks (10 ms), so only a
    share of a run of seconds, not of one request."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                stat = f.read()
            # "pid (comm) state ...": stime is the 15th field, the 13th after comm.
            total += int(stat[stat.rindex(")") + 2:].split()[12]) * tick_ns
        except (OSError, ValueError, IndexError):
            pass
    return total


def _cpu_times():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return sum(v[:8]), idle


def busy_fraction(window=0.2):
    """Share of the machine's CPU time used over window (by anyone)."""
    t0, i0 = _cpu_times()
    time.sleep(window)
    t1, i1 = _cpu_times()
    return 0.0 if t1 == t0 else 1.0 - (i1 - i0) / (t1 - t0)


# Waiting for a quiet machine: at most max_wait per run and `budget` seconds
# in all (set by the harness), so a busy machine slows a run down only so much.
QUIET = {"waited_s": 0.0, "budget": 120.0, "samples": []}


def wait_quiet(max_wait=8.0, threshold=0.25):
    """Before a measurement (when none of our processes run): waits up to
    max_wait for the CPU use of the machine (by others: ours is stopped) to
    drop below threshold. Records and returns the last fraction seen (0..1)."""
    t0 = now()
    busy = busy_fraction()
    while busy > threshold and now() - t0 < max_wait and QUIET["waited_s"] + (now() - t0) < QUIET["budget"]:
        busy = busy_fraction(0.5)
    QUIET["waited_s"] += now() - t0
    QUIET["samples"].append(round(busy, 3))
    return round(busy, 3)


TMPS = []


def fresh_tmp(quiet=True):
    """A temporary directory for one run, once the machine is quiet enough.
    All of them are removed by remove_tmps() at the end."""
    if quiet:
        wait_quiet()
    d = tempfile.mkdtemp(prefix="bench-", dir="/tmp")
    TMPS.append(d)
    return d


def remove_tmps():
    while TMPS:
        shutil.rmtree(TMPS.pop(), ignore_errors=True)


def exec_cpu_ms(argv, times=40):
    """Median CPU time (user + system, ms) of one run of argv, as seen by its
    parent (rusage of the child: exec, loading, run, exit)."""
    vals = []
    env = {"PATH": "/usr/bin:/bin"}
    for _ in range(times):
        pid = os.posix_spawn(argv[0], argv, env, file_actions=[
            (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0)])
        _, _, ru = os.wait4(pid, 0)
        vals.append((ru.ru_utime + ru.ru_stime) * 1000)
    vals.sort()
    return round(vals[len(vals) // 2], 3)


def smaps_rollup(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                m = re.match(r"(\w+):\s+(\d+) kB", line)
                if m:
                    out[m.group(1)] = int(m.group(2))
    except OSError:
        pass
    return out


def text_mapping_kb(pid):
    """(size, resident) in kB of the executable mappings of pid's own binary."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None, None
    size = rss = 0
    cur = False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    parts = line.split()
                    cur = len(parts) > 5 and parts[5] == exe and "x" in parts[1]
                elif cur and line.startswith("Size:"):
                    size += int(line.split()[1])
                elif cur and line.startswith("Rss:"):
                    rss += int(line.split()[1])
    except OSError:
        return None, None
    return size, rss


def rss_by_mapping(pid, top=6):
    """The mappings that hold the most resident memory: [(name, kB)]."""
    per = {}
    name = None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    parts = line.split()
                    name = parts[5] if len(parts) > 5 else "[anon]"
                    name = os.path.basename(name) if name.startswith("/") else name
                elif line.startswith("Rss:"):
                    per[name] = per.get(name, 0) + int(line.split()[1])
    except OSError:
        return []
    return sorted(per.items(), key=lambda kv: -kv[1])[:top]


class PidWatch:
    """Watches processes for exit with pidfds (works for non-children too)."""

    def __init__(self, pids):
        self.fds = {}
        for p in pids:
            try:
                self.fds[p] = os.pidfd_open(p)
            except OSError:
                pass  # already gone
        self.gone = {p: None for p in self.fds}

    def wait_all(self, t0, cap):
        """Seconds from t0 until every watched process exited (None for one
        still alive at t0 + cap); returns {pid: seconds or None}."""
        poller = select.poll()
        by_fd = {}
        for p, fd in self.fds.items():
            if self.gone[p] is None:
                poller.register(fd, select.POLLIN)
                by_fd[fd] = p
        left = set(by_fd.values())
        while left:
            remaining = t0 + cap - now()
            if remaining <= 0:
                break
            for fd, _ in poller.poll(remaining * 1000):
                p = by_fd[fd]
                if p in left:
                    self.gone[p] = now() - t0
                    left.discard(p)
                    poller.unregister(fd)
        return dict(self.gone)

    def kill_survivors(self):
        for p, fd in self.fds.items():
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


# --------------------------------------------------------------------------
# A started subject


class Running:
    """A master process started in its own process group (as a shell starts a
    job), its output (stdout and stderr) captured line by line with the time
    each line was read."""

    def __init__(self, subject, argv, env, cwd=ROOT, log_path=None):
        self.subject = subject
        self.argv = [str(a) for a in argv]
        self.lines = []
        self.cond = threading.Condition()
        self.log = open(log_path, "ab") if log_path else None
        if self.log:
            self.log.write(("$ " + shlex.join(self.argv) + "\n").encode())
        self.seen = set()
        self.masters = set()  # masters that replaced ours (drover upgrade)
        self.notify_dirs = set()
        self.t0 = now()
        self.p = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
        self.pid = self.p.pid
        self.pidfd = os.pidfd_open(self.pid)
        self.exit_t = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in iter(self.p.stdout.readline, b""):
            t = now()
            with self.cond:
                self.lines.append((t, raw.decode(errors="replace").rstrip("\n")))
                self.cond.notify_all()
            if self.log:
                self.log.write(b"%+10.4f " % (t - self.t0) + raw)

    def wait_line(self, pattern, timeout, after=0.0):
        """(time, match) of the first output line matching pattern read at or
        after `after`, waiting up to timeout; None when it does not come."""
        rx = re.compile(pattern)
        deadline = now() + timeout
        i = 0
        with self.cond:
            while True:
                while i < len(self.lines):
                    t, text = self.lines[i]
                    i += 1
                    if t >= after:
                        m = rx.search(text)
                        if m:
                            return t, m
                left = deadline - now()
                if left <= 0 or (self.exited() and i >= len(self.lines)):
                    return None
                self.cond.wait(min(left, 0.05))

    def wait_distinct(self, pattern, n, timeout):
        """Time at which output lines matching pattern (group 1: a pid) have
        named n distinct pids, or None after timeout."""
        rx = re.compile(pattern)
        deadline = now() + timeout
        pids = set()
        i = 0
        with self.cond:
            while True:
                while i < len(self.lines):
                    t, text = self.lines[i]
                    i += 1
                    m = rx.search(text)
                    if m:
                        pids.add(m.group(1))
                        if len(pids) >= n:
                            return t
                left = deadline - now()
                if left <= 0 or (self.exited() and i >= len(self.lines)):
                    return None
                self.cond.wait(min(left, 0.05))

    def output(self, last=None):
        with self.cond:
            lines = [text for _, text in self.lines]
        return lines if last is None else lines[-last:]

    def workers(self):
        d = descendants(self.pid)
        self.seen.update((p, (proc_stat(p) or (0, 0, 0, 0))[3]) for p in d)
        for p in d[:1]:
            # drover's private notify directory: removed by drover when it
            # exits, but not when the harness SIGKILLs it.
            try:
                with open(f"/proc/{p}/environ", "rb") as f:
                    for var in f.read().split(b"\0"):
                        if var.startswith(b"NOTIFY_SOCKET=/tmp/drover-"):
                            self.notify_dirs.add(os.path.dirname(var.split(b"=", 1)[1].decode()))
            except OSError:
                pass
        return d

    def exited(self):
        return self.p.poll() is not None

    def wait_exit(self, t0, cap):
        """Seconds from t0 to the master's exit (precise: a pidfd), or None."""
        r, _, _ = select.select([self.pidfd], [], [], max(0.0, t0 + cap - now()))
        if not r:
            return None
        t = now()
        self.p.wait()
        return t - t0

    def current_master(self):
        """The master's pid: after a drover binary upgrade, the new one."""
        pid = self.pid
        with self.cond:
            for _, text in self.lines:
                m = re.search(r"upgrade: new master pid (\d+) ready", text)
                if m:
                    pid = int(m.group(1))
        if pid != self.pid:
            self.masters.add(pid)
        return pid

    def signal(self, sig):
        os.kill(self.current_master(), sig)

    def signal_group(self, sig):
        os.killpg(self.pid, sig)

    def stop(self):
        """Kills everything this run started, whatever state it is in."""
        self.current_master()
        for m in self.masters:
            for p in descendants(m) + [m]:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
        pids = self.workers() if not self.exited() else []
        if not self.exited():
            try:
                self.p.kill()
            except OSError:
                pass
        for p in pids:
            try:
                os.killpg(p, signal.SIGKILL)
            except OSError:
                pass
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        # Anything seen earlier that still runs (orphans of a killed master).
        for p, start in self.seen:
            st = proc_stat(p)
            if st and st[3] == start and st[0] != "Z":
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass
        os.close(self.pidfd)
        for d in self.notify_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.reader.join(timeout=2)
        if self.log:
            self.log.close()
            self.log = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# --------------------------------------------------------------------------
# HTTP probes


def parse_head(raw):
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return None, {}, b""
    head = raw[:end].decode(errors="replace").split("\r\n")
    try:
        status = int(head[0].split(" ")[1])
    except (IndexError, ValueError):
        status = None
    headers = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, raw[end + 4:]


def http_get(port, path="/", timeout=10.0, connect_timeout=None):
    """One GET with Connection: close. Returns a dict: outcome ("ok",
    "refused", "reset", "timeout", "truncated", "status", "error"), status,
    pid, seconds."""
    t0 = now()
    res = {"outcome": None, "status": None, "pid": None}
    s = socket.socket()
    s.settimeout(connect_timeout if connect_timeout is not None else timeout)
    try:
        s.connect(("127.0.0.1", port))
        s.settimeout(timeout)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            raw += chunk
        status, headers, body = parse_head(raw)
        res["status"] = status
        res["pid"] = int(headers["x-worker-pid"]) if "x-worker-pid" in headers else None
        n = headers.get("content-length")
        if status is None or (n is not None and int(n) != len(body)):
            res["outcome"] = "truncated" if raw else "closed (empty reply)"
        elif status == 200:
            res["outcome"] = "ok"
        else:
            res["outcome"] = f"status {status}"
    except ConnectionRefusedError:
        res["outcome"] = "refused"
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
        res["outcome"] = "reset"
    except socket.timeout:
        res["outcome"] = "timeout"
    except OSError as e:
        res["outcome"] = f"error {e.strerror or e}"
    finally:
        s.close()
    res["seconds"] = now() - t0
    return res


def get_until_ok(port, timeout, path="/"):
    """GETs until a 200; returns (time of the 200, response) or None."""
    deadline = now() + timeout
    while now() < deadline:
        r = http_get(port, path, timeout=max(0.1, deadline - now()))
        if r["outcome"] == "ok":
            return now(), r
        time.sleep(0.001)
    return None


def distinct_pids(port, n, timeout, conc=None, path=f"/sleep?ms={PROBE_SLEEP_MS}", stop=None):
    """Keeps `conc` connections busy with GETs until n distinct worker pids
    (X-Worker-Pid) have answered 200. Returns {"t_first", "t_all" (monotonic
    times or None), "pids" (pid -> time of its first answer), "answers"}."""
    conc = conc or min(max(2 * n, 8), 256)
    req = f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode()
    sel = selectors.DefaultSelector()
    pids = {}
    answers = []  # times of every 200
    deadline = now() + timeout
    pending_retry = []  # times at which to reopen a refused connection
    out = {"t_first": None, "t_all": None}

    def open_one():
        s = socket.socket()
        s.setblocking(False)
        err = s.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            pending_retry.append(now() + 0.0005)
            return
        sel.register(s, selectors.EVENT_WRITE, {"buf": b"", "sent": False})

    for _ in range(conc):
        open_one()
    try:
        while len(pids) < n and now() < deadline and not (stop and stop()):
            t = now()
            while pending_retry and pending_retry[0] <= t:
                pending_retry.pop(0)
                open_one()
            wait = deadline - t
            if pending_retry:
                wait = min(wait, max(0.0, pending_retry[0] - t))
            for key, ev in sel.select(min(wait, 0.05)):
                s, st = key.fileobj, key.data
                if not st["sent"]:
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        sel.unregister(s)
                        s.close()
                        pending_retry.append(now() + 0.0005)
                        continue
                    try:
                        s.send(req)
                    except OSError:
                        sel.unregister(s)
                        s.close()
                        pending_retry.append(now() + 0.0005)
                        continue
                    st["sent"] = True
                    sel.modify(s, selectors.EVENT_READ, st)
                    continue
                try:
                    chunk = s.recv(65536)
                except OSError:
                    chunk = None
                if chunk:
                    st["buf"] += chunk
                    continue
                t = now()
                sel.unregister(s)
                s.close()
                status, headers, _ = parse_head(st["buf"] or b"")
                if status == 200:
                    answers.append(t)
                    if out["t_first"] is None:
                        out["t_first"] = t
                    pid = headers.get("x-worker-pid")
                    if pid and int(pid) not in pids:
                        pids[int(pid)] = t
                        if len(pids) >= n:
                            out["t_all"] = t
                open_one()
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()
    out["pids"] = pids
    out["answers"] = answers
    return out


class InFlight(threading.Thread):
    """A GET running on its own thread, with the times it started and ended."""

    def __init__(self, port, path, timeout=60.0, connect_timeout=None):
        super().__init__(daemon=True)
        self.args = (port, path, timeout, connect_timeout)
        self.result = None
        self.t_start = None
        self.t_end = None
        self.start()

    def run(self):
        self.t_start = now()
        self.result = http_get(*self.args)
        self.t_end = now()


def socket_count(pid):
    try:
        return sum(1 for fd in os.listdir(f"/proc/{pid}/fd")
                   if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"))
    except OSError:
        return 0


def send_slow_request(run, port, ms_, timeout=60.0):
    """Starts GET /sleep?ms=ms_ and returns once a worker holds it."""
    ws = run.workers()
    before = {p: socket_count(p) for p in ws}
    req = InFlight(port, f"/sleep?ms={ms_}", timeout=timeout)
    deadline = now() + 2.0
    while now() < deadline:
        if any(socket_count(p) > c for p, c in before.items()):
            break
        time.sleep(0.002)
    time.sleep(0.02)
    return req


# --------------------------------------------------------------------------
# Load generators


def run_wrk(port, threads, conns, seconds, path="/"):
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "5s",
            f"http://127.0.0.1:{port}{path}"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    return parse_wrk(p.stdout), shlex.join(argv)


def _to_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        return None
    v, u = float(m.group(1)), m.group(2)
    return {"us": v / 1000, "ms": v, "s": v * 1000, "m": v * 60000}[u]


def parse_wrk(out):
    r = {"raw": out}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else None
    m = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if m:
        r["lat_avg_ms"], r["lat_max_ms"] = _to_ms(m.group(1)), _to_ms(m.group(3))
    for p in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{p}%\s+(\S+)", out, re.M)
        r[f"p{p}_ms"] = _to_ms(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in", out)
    r["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()))) if m else {}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non2xx"] = int(m.group(1)) if m else 0
    r["errors"] = sum(r["socket_errors"].values()) + r["non2xx"]
    return r


def run_loadgen(port, seconds, conns=50, path="/"):
    """Starts the load generator; returns (Popen, argv string)."""
    argv = [str(LOADGEN), "--addr", f"127.0.0.1:{port}", "--conns", str(conns),
            "--duration", str(seconds), "--path", path]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    return p, shlex.join(argv)


def finish_loadgen(p, timeout):
    out, _ = p.communicate(timeout=timeout)
    return json.loads(out)


# --------------------------------------------------------------------------
# Subjects: how each system is started with N workers on a port


def base_env(tmp, extra=None):
    env = dict(os.environ)
    for k in ("RUST_LOG", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "PYTHONPATH"):
        env.pop(k, None)
    env["PYTHONPATH"] = str(APPS)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["HELLO_CLEANUP_FILE"] = str(Path(tmp) / "cleanup.log")
    env["BENCH_CLEANUP_FILE"] = str(Path(tmp) / "cleanup.log")
    env["PATH"] = f"{VENV / 'bin'}:{env.get('PATH', '')}"
    if extra:
        env.update(extra)
    return env


class Subject:
    """One system under test. `kind` is drover, gunicorn, circus or alone;
    `worker` is hello (the Rust reference worker) or wsgi (a Python WSGI app)."""

    def __init__(self, key, label, kind, worker):
        self.key, self.label, self.kind, self.worker = key, label, kind, worker
        self.unavailable = None  # reason, once known
        self.ready_mode = "notify"  # drover only
        self.app = "bench_app:app"
        # More drover settings (--set) or Gunicorn options: the preload variants.
        self.extra = []
        self.worker_extra = []  # options of drover-wsgi, before the app

    def worker_argv(self):
        if self.worker == "hello":
            return [str(HELLO)]
        return [str(WSGI_WORKER)] + self.worker_extra + [self.app]

    def argv(self, n, port, tmp, settings=()):
        if self.kind == "drover":
            a = [str(DROVER), "-w", str(n), "-b", f"127.0.0.1:{port}", "--set", f"ready={self.ready_mode}"]
            for s in list(settings) + self.extra:
                a += ["--set", s]
            return a + ["--"] + self.worker_argv()
        if self.kind == "gunicorn":
            return [str(VENV / "bin" / "gunicorn"), "--worker-class", "sync", "-w", str(n),
                    "-b", f"127.0.0.1:{port}", "--chdir", str(APPS), "--log-level", "info"] + self.extra + [self.app]
        if self.kind == "circus":
            ini = Path(tmp) / "circus.ini"
            cmd = shlex.join([str(TO_LISTEN_FDS), "FD"] + self.worker_argv()).replace(" FD ", " $(circus.sockets.web) ", 1)
            ini.write_text(
                "[circus]\n"
                f"endpoint = ipc://{tmp}/circus-endpoint\n"
                f"pubsub_endpoint = ipc://{tmp}/circus-pubsub\n"
                "check_delay = 5\n"
                "statsd = False\n\n"
                "[watcher:web]\n"
                f"cmd = {cmd}\n"
                f"numprocesses = {n}\n"
                "use_sockets = True\n"
                "copy_env = True\n"
                "warmup_delay = 0\n"
                "graceful_timeout = 30\n\n"
                "[socket:web]\n"
                "host = 127.0.0.1\n"
                f"port = {port}\n"
            )
            return [str(VENV / "bin" / "circusd"), "--log-level", "info", str(ini)]
        if self.kind == "alone":
            return [str(VENV_PY), str(SOCKET_EXEC), f"127.0.0.1:{port}", "--"] + self.worker_argv()
        raise ValueError(self.kind)

    def start(self, n, port, tmp, log_path, settings=(), env_extra=None):
        if self.unavailable:
            raise Unavailable(self.unavailable)
        return Running(self, self.argv(n, port, tmp, settings), base_env(tmp, env_extra), log_path=log_path)

    def wait_ready(self, run, n, port, timeout):
        """Waits until the subject serves with n workers; returns the
        monotonic time, or raises Unavailable."""
        if self.kind == "drover":
            hit = run.wait_line(r"all (\d+) workers ready", timeout)
            if not hit:
                raise Unavailable(f"drover did not log 'all {n} workers ready' within {timeout}s: "
                                  + " | ".join(run.output(last=4)))
            ok = get_until_ok(port, 5.0)
            if not ok:
                raise Unavailable("no 200 after 'all workers ready'")
            return ok[0]
        if self.kind in ("circus", "alone"):
            t = run.wait_distinct(WORKER_READY, n, timeout)
            if t is None:
                raise Unavailable(f"fewer than {n} worker 'ready' lines within {timeout}s: "
                                  + " | ".join(run.output(last=4)))
            return t
        r = distinct_pids(port, n, timeout, stop=run.exited)
        if r["t_all"] is None:
            raise Unavailable(f"only {len(r['pids'])} of {n} workers answered within {timeout}s: "
                              + " | ".join(run.output(last=4)))
        return r["t_all"]


def cleanup_count(tmp):
    try:
        return (Path(tmp) / "cleanup.log").read_text().count("cleanup pid=")
    except OSError:
        return 0


def reset_cleanup(tmp):
    try:
        (Path(tmp) / "cleanup.log").unlink()
    except OSError:
        pass


def which(cmd):
    return shutil.which(cmd)
