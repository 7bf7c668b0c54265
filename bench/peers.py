"""The peers scenario: drover_wsgi side by side with the fastest Python
servers, in one run (issue 17's measurements).

Every subject serves the same app with 2 processes (and 4 threads where the
server has threads): drover + drover_wsgi with its native core and with its
pure-Python core, drover + uWSGI, drover + Granian
(drover-granian), Gunicorn gthread (its own master), drover + bjoern (one
thread per process). Four loads: bench_app's `/` with keep-alive, the same
with `Connection: close`, the Flask app's `/` with keep-alive, each with
`wrk -t2 -c16` as fast as the subject answers, and bench_app's `/` paced
(keep-alive, each connection waiting 1 ms after each response, wrk-paced.lua):
the same load for every subject, well below saturation, to compare latency
where it does not depend on how the subject shares the two CPUs with wrk. Each round runs every (load, subject) pair, the subjects in
a rotating order, so that a drift of the shared machine does not always hit
the same one. Measured: requests/s, p99, and CPU per request (the CPU time of
the subject's whole process tree during the wrk run, divided by its
requests), and for the keep-alive loads how many of the 16 connections got
no answer at all while all of them asked (`starved`): wrk records the
latency of answered requests only, so a server that leaves connections
waiting shows the tail of the ones it serves. uWSGI's http11 keeps a
connection with one thread until it closes: 2 processes of 4 threads serve
8 connections, and the other 8 wait as long as those stay open.
"""

import asyncio
import os
import shlex
import socket
import subprocess
import time

import harness as H


def say(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)

THREADS = 4
WORKERS = 2
CONNS = 16
#: (name, app, Connection: close, paced)
LOADS = [
    ("hello-keepalive", "bench_app:app", False, False),
    ("hello-close", "bench_app:app", True, False),
    ("flask-keepalive", "flask_app:app", False, False),
    ("hello-paced", "bench_app:app", False, True),
]
PACED = H.BENCH / "wrk-paced.lua"
SUBJECTS = ["drover-wsgi-native", "drover-wsgi", "drover-uwsgi", "drover-granian", "gunicorn-gthread", "drover-bjoern"]
LABELS = {
    "drover-wsgi-native": "drover + drover_wsgi (native core)",
    "drover-wsgi": "drover + drover_wsgi (pure Python)",
    "drover-uwsgi": "drover + uWSGI",
    "drover-granian": "drover + Granian",
    "gunicorn-gthread": "Gunicorn (gthread)",
    "drover-bjoern": "drover + bjoern",
}
#: What a subject needs in the bench venv, to say "not installed".
NEEDS = {
    "drover-wsgi-native": ("drover_wsgi_native", "drover-wsgi-native"),
    "drover-uwsgi": ("uwsgi", "uWSGI"),
    "drover-granian": ("granian", "granian"),
    "gunicorn-gthread": ("gunicorn", "gunicorn"),
    "drover-bjoern": ("bjoern", "bjoern"),
}


def _drover(port, ready, settings, worker):
    argv = [str(H.DROVER), "-w", str(WORKERS), "-b", f"127.0.0.1:{port}", "--set", f"ready={ready}"]
    for s in settings:
        argv += ["--set", s]
    return argv + ["--"] + worker


def argv_of(key, app, port, close):
    bin_ = H.VENV / "bin"
    if key in ("drover-wsgi", "drover-wsgi-native"):
        core = "native" if key == "drover-wsgi-native" else "python"
        return _drover(port, "notify", [], [str(H.WSGI_WORKER), "--core", core, "--threads", str(THREADS), app])
    if key == "drover-uwsgi":
        # uWSGI's http11 ignores a client's Connection: close (docs/workers.md):
        # the close load gets its http protocol, which closes every connection.
        proto = "http" if close else "http11"
        return _drover(port, "notify", ["stop_signal=SIGHUP"], [
            str(bin_ / "uwsgi"), "--protocol", proto, "--module", app, "--pythonpath", str(H.APPS),
            "--threads", str(THREADS), "--disable-logging"])
    if key == "drover-granian":
        return _drover(port, "notify", [], [str(bin_ / "drover-granian"), "--blocking-threads", str(THREADS), app])
    if key == "gunicorn-gthread":
        return [str(bin_ / "gunicorn"), "--worker-class", "gthread", "-w", str(WORKERS), "--threads", str(THREADS),
                "-b", f"127.0.0.1:{port}", "--chdir", str(H.APPS), "--log-level", "warning", app]
    if key == "drover-bjoern":
        return _drover(port, "spawn", [], [str(H.VENV_PY), str(H.BENCH / "adapters" / "bjoern_worker.py"), app])
    raise ValueError(key)


def not_installed(key):
    need = NEEDS.get(key)
    if need is None:
        return None
    module, dist = need
    if key == "drover-uwsgi":
        ok = (H.VENV / "bin" / "uwsgi").exists()
    else:
        ok = subprocess.run([str(H.VENV_PY), "-c", f"import {module}"], capture_output=True).returncode == 0
    return None if ok else f"{dist} is not installed in bench/.venv (bench/requirements*.txt)"


def probe(port, path="/"):
    """One GET; True on a 200. Reads the response by its Content-Length, not
    to the close: uWSGI's http11 keeps the connection open whatever we ask."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    return False
                data += chunk
            return data.split(b" ", 2)[1] == b"200"
    except OSError:
        return False


def wait_serving(run, port, timeout=60):
    deadline = H.now() + timeout
    if run.argv[0] == str(H.DROVER) and not run.wait_line(r"all (\d+) workers ready", timeout):
        raise H.Unavailable("drover did not log 'all workers ready': " + " | ".join(run.output(last=4)))
    # Every process answering (Gunicorn's workers import the app after its
    # master is up): a few answers in a row from the whole tree.
    ok = 0
    while ok < 20:
        if run.exited() or H.now() > deadline:
            raise H.Unavailable("not serving: " + " | ".join(run.output(last=4)))
        ok = ok + 1 if probe(port) else 0
        if not ok:
            time.sleep(0.05)
    time.sleep(0.3)


async def _asker(port, deadline, answered):
    """Requests back to back on one keep-alive connection until the deadline;
    counts the answers that came before it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), left)
            except asyncio.TimeoutError:  # noqa: UP041 (TimeoutError only from Python 3.11)
                return
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            try:
                await asyncio.wait_for(reader.readexactly(length), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:  # noqa: UP041 (TimeoutError only from Python 3.11)
                return
            answered[0] += 1
    finally:
        writer.close()


def starved(port, conns=CONNS, secs=2.0):
    """How many of `conns` keep-alive connections, all asking back to back for
    `secs`, got no answer at all."""
    async def run():
        deadline = time.monotonic() + secs
        counts = [[0] for _ in range(conns)]
        await asyncio.gather(*(_asker(port, deadline, c) for c in counts), return_exceptions=True)
        return sum(1 for c in counts if c[0] == 0)
    return asyncio.run(run())


def tree_cpu_ns(root):
    """CPU time and its kernel part (ns) of root's process tree."""
    tree = [root] + H.descendants(root)
    return sum(H.cpu_ns(p) or 0 for p in tree), sum(H.kernel_ns(p) or 0 for p in tree)


def tree_sched(root):
    """schedstat (harness.schedstat) summed over root's process tree."""
    stats = [H.schedstat(p) for p in [root] + H.descendants(root)]
    return tuple(sum(st[i] for st in stats if st) for i in range(3))


def run_wrk(port, secs, close, paced):
    """wrk's results, its command, and how its threads shared the CPUs:
    their schedstat from 0.5 s in to 0.5 s before the end (the threads
    are gone once it prints), with the share of the run that window is."""
    argv = ["wrk", "-t2", f"-c{CONNS}", f"-d{secs}s", "--latency", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    if paced:
        argv += ["-s", str(PACED)]
    argv.append(f"http://127.0.0.1:{port}/")
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    t0, w0 = time.monotonic(), H.schedstat(p.pid)
    time.sleep(max(0.0, secs - 1.0))
    t1, w1 = time.monotonic(), H.schedstat(p.pid)
    out, _ = p.communicate(timeout=secs + 30)
    sched = None
    if w0 and w1:
        sched = ([b - a for a, b in zip(w0, w1)], (t1 - t0) / secs)
    return H.parse_wrk(out), shlex.join(argv), sched


def measure(ctx, key, load, app, close, paced, secs):
    tmp = H.fresh_tmp()
    port = H.free_port()
    env = H.base_env(tmp, {"PYTHONPATH": f"{H.APPS}:{H.EXAMPLES}"})
    argv = argv_of(key, app, port, close)
    with H.Running(None, argv, env, cwd=H.APPS, log_path=ctx.log_path("peers", key, "-" + load)) as run:
        ctx.note_command("peers", f"{key} ({load})", shlex.join(run.argv))
        wait_serving(run, port)
        cpu0, kernel0 = tree_cpu_ns(run.pid)
        s0 = tree_sched(run.pid)
        r, cmd, wrk_sched = run_wrk(port, secs, close, paced)
        s1 = tree_sched(run.pid)
        cpu1, kernel1 = tree_cpu_ns(run.pid)
        cpu, kernel = cpu1 - cpu0, kernel1 - kernel0
        ctx.note_command("peers", f"wrk ({load})", cmd.replace(str(port), "PORT").replace(str(H.BENCH), "bench"))
        if not close:
            r["starved"] = starved(port)
    r.pop("raw", None)
    if r.get("requests"):
        r["cpu_us_per_req"] = round(cpu / 1000 / r["requests"], 2)
        r["kernel_us_per_req"] = round(kernel / 1000 / r["requests"], 2)
        r["sched"] = _shared(r["requests"], [b - a for a, b in zip(s0, s1)], wrk_sched)
    return r


def _shared(requests, server, wrk_sched):
    """How the subject and wrk shared the CPUs, per request: each one's runs
    on a CPU (times put on one) and its wait for a CPU while runnable (µs)."""
    out = {"server_runs": round(server[2] / requests, 3), "server_wait_us": round(server[1] / 1000 / requests, 2)}
    if wrk_sched:
        (_, wait, runs), share = wrk_sched
        n = requests * share
        out["wrk_runs"] = round(runs / n, 3)
        out["wrk_wait_us"] = round(wait / 1000 / n, 2)
    return out


def _subset(env, every):
    """The names in $env (comma-separated) that are in `every`, in its order;
    all of them when $env is unset: a quicker run while iterating."""
    wanted = os.environ.get(env)
    if not wanted:
        return every
    names = [w.strip() for w in wanted.split(",") if w.strip()]
    unknown = [n for n in names if n not in every]
    if unknown:
        raise SystemExit(f"{env}: unknown {', '.join(unknown)} (one of {', '.join(every)})")
    return [n for n in every if n in names]


def sc_peers(ctx):
    secs = 2 if ctx.quick else 5
    subjects = _subset("BENCH_PEERS_SUBJECTS", SUBJECTS)
    loads = _subset("BENCH_PEERS_LOADS", [x[0] for x in LOADS])
    paced = [x[0] for x in LOADS if x[3]]
    missing = {k: why for k in SUBJECTS if (why := not_installed(k))}
    missing.update({k: "left out (BENCH_PEERS_SUBJECTS)" for k in SUBJECTS if k not in subjects})
    rounds = []
    for rnd in range(ctx.reps):
        shift = rnd % len(SUBJECTS)
        order = [k for k in SUBJECTS[shift:] + SUBJECTS[:shift] if k not in missing]
        this = {}
        for load, app, close, pace in LOADS:
            if load not in loads:
                continue
            for key in order:
                try:
                    r = measure(ctx, key, load, app, close, pace, secs)
                except H.Unavailable as e:
                    r = {"error": str(e)}
                this.setdefault(load, {})[key] = r
                say(f"peers round {rnd + 1} {load} {key}: {r.get('rps')} req/s, p99 {r.get('p99_ms')} ms, "
                      f"{r.get('cpu_us_per_req')} us CPU/req ({r.get('kernel_us_per_req')} in the kernel), errors {r.get('errors')}, starved {r.get('starved')}", r.get("error", ""))
        rounds.append({"order": order, "loads": this})
    return {"rounds": rounds, "seconds": secs, "conns": CONNS, "threads": THREADS, "workers": WORKERS,
            "subjects": SUBJECTS, "labels": LABELS, "loads": loads, "paced": paced, "not_installed": missing,
            "versions": versions()}


def versions():
    out = {}
    for dist in ("uWSGI", "granian", "gunicorn", "bjoern", "flask"):
        p = subprocess.run([str(H.VENV_PY), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                           capture_output=True, text=True)
        out[dist] = p.stdout.strip() if p.returncode == 0 else None
    return out


# --------------------------------------------------------------------------
# The report's section


def _med(values):
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def render(s, L):
    w = L.append
    w("## Peers: drover_wsgi and the fastest Python servers")
    w("")
    if not s or s.get("crashed"):
        w("Not run." if not s else "The scenario crashed: see the run's output.")
        w("")
        return
    vers = s.get("versions", {})
    w(f"`wrk -t2 -c{s['conns']} -d{s['seconds']}s --latency` on `/`, {s['workers']} processes per subject, "
      f"{s['threads']} threads where the server has threads; {len(s['rounds'])} round(s), the subjects in a "
      "rotating order in each. CPU per request is the CPU time of the subject's whole process tree during "
      "the wrk run divided by its requests (wrk's own CPU is not counted); in brackets, the part of it "
      "spent in the kernel (from the threads' stime, in clock ticks). Versions: "
      + ", ".join(f"{k} {v}" for k, v in vers.items() if v) + ".")
    w("")
    for key, why in s.get("not_installed", {}).items():
        w(f"- {s['labels'][key]}: not available ({why}).")
    if s.get("not_installed"):
        w("")
    w("uWSGI serves the keep-alive loads with `--protocol http11` and the `Connection: close` load with "
      "`--protocol http` (its http11 does not honour a client's close); bjoern has one thread per process "
      "and no graceful stop (`bench/adapters/bjoern_worker.py`). uWSGI's http protocol closes the connection "
      "after each response without saying `Connection: close`, so wrk counts a read error (the close) after "
      "each complete response of that row: its errors there are not failed requests.")
    w("")
    for load in s["loads"]:
        w(f"### {load}")
        w("")
        paced = load in s.get("paced", [])
        if paced:
            w("Paced: each connection waits 1 ms after each response before its next request "
              "(`-s bench/wrk-paced.lua`), so every subject gets about the same load, well below saturation; "
              "the latency is what counts here (a subject that leaves connections unanswered serves fewer).")
            w("")
        w("| subject | requests/s (median) | vs drover_wsgi (pure Python) | p99, ms | CPU µs/request (of which kernel) | errors "
          f"| connections never answered (of {s['conns']}), per round | per round, req/s |")
        w("|---|---:|---:|---:|---:|---:|---|---|")
        per = {}
        for rnd in s["rounds"]:
            for key, r in rnd["loads"].get(load, {}).items():
                per.setdefault(key, []).append(r)
        base = _med([r.get("rps") for r in per.get("drover-wsgi", [])])
        for key in s["subjects"]:
            rs = per.get(key)
            if not rs:
                continue
            rps = _med([r.get("rps") for r in rs])
            errs = [r.get("error") for r in rs if r.get("error")]
            vs = f"{rps / base:.2f}×" if rps and base else ""
            p99 = _med([r.get("p99_ms") for r in rs])
            cpu = _med([r.get("cpu_us_per_req") for r in rs])
            kernel = _med([r.get("kernel_us_per_req") for r in rs])
            w(f"| {s['labels'][key]} | {f'{rps:,.0f}' if rps else 'failed: ' + '; '.join(errs)[:120]} | {vs} | "
              f"{f'{p99:.2f}' if p99 is not None else ''} | {f'{cpu:.1f}' if cpu is not None else ''}{f' ({kernel:.1f})' if kernel is not None else ''} | "
              f"{sum(r.get('errors') or 0 for r in rs)} | "
              + ", ".join(str(r["starved"]) if r.get("starved") is not None else "—" for r in rs) + " | "
              + ", ".join(f"{r['rps']:,.0f}" if r.get("rps") else "—" for r in rs) + " |")
        w("")
        # Per-round ratios against the faster of uWSGI and Granian and the
        # fastest of those and bjoern (requests/s; issue 17's targets), and
        # against uWSGI (p99).
        for key in ("drover-wsgi-native", "drover-wsgi"):
            if paced:
                _paced_line(s, load, key, w)
                continue
            ratios, with_bjoern, tails = [], [], []
            for rnd in s["rounds"]:
                rl = rnd["loads"].get(load, {})
                mine = rl.get(key) or {}

                def fastest(keys, rl=rl):
                    return max((x for x in ((rl.get(k) or {}).get("rps") for k in keys) if x), default=None)
                peers = fastest(("drover-uwsgi", "drover-granian"))
                if mine.get("rps") and peers:
                    ratios.append(mine["rps"] / peers)
                bjoern = (rl.get("drover-bjoern") or {}).get("rps")
                if mine.get("rps") and bjoern:
                    with_bjoern.append(mine["rps"] / max(bjoern, peers or 0))
                uwsgi_p99 = (rl.get("drover-uwsgi") or {}).get("p99_ms")
                if mine.get("p99_ms") and uwsgi_p99:
                    tails.append(mine["p99_ms"] / uwsgi_p99)
            if ratios:
                line = (f"{s['labels'][key]} against the faster of uWSGI and Granian, per round: "
                        + ", ".join(f"{x:.2f}×" for x in ratios))
                if with_bjoern:
                    line += ("; against the fastest of uWSGI, Granian and bjoern: "
                             + ", ".join(f"{x:.2f}×" for x in with_bjoern))
                w(line + "; its p99 against uWSGI's: " + ", ".join(f"{x:.2f}×" for x in tails) + ".")
                w("")
        if not paced:
            _shared_table(s, per, w)


def _shared_table(s, per, w):
    """How each subject and wrk shared the two CPUs (medians of the rounds),
    from the threads' schedstat: what the p99 at saturation is made of."""
    rows = []
    for key in s["subjects"]:
        sh = [r["sched"] for r in per.get(key, []) if r.get("sched")]
        if sh:
            rows.append((key, {k: _med([x.get(k) for x in sh]) for k in
                               ("server_runs", "server_wait_us", "wrk_runs", "wrk_wait_us")}))
    if not rows:
        return
    w("How the subject and wrk shared the two CPUs, per request (medians of the rounds; from the threads' "
      "schedstat: a *run* is one stretch on a CPU, from being put on it to leaving it; the *wait* is the time "
      "runnable but waiting for a CPU). Few runs per request mean long runs, behind which the other side waits:")
    w("")
    w("| subject | its runs per request | its wait, µs per request | wrk's runs per request | wrk's wait, µs per request |")
    w("|---|---:|---:|---:|---:|")

    def f(v, d):
        return "" if v is None else f"{v:.{d}f}"
    for key, m in rows:
        w(f"| {s['labels'][key]} | {f(m['server_runs'], 2)} | {f(m['server_wait_us'], 1)} | "
          f"{f(m['wrk_runs'], 2)} | {f(m['wrk_wait_us'], 1)} |")
    w("")


def _paced_line(s, load, key, w):
    """The subject's p50 and p99 against uWSGI's and bjoern's, per round."""
    parts = []
    for peer in ("drover-uwsgi", "drover-bjoern"):
        for pct in ("p50_ms", "p99_ms"):
            ratios = []
            for rnd in s["rounds"]:
                rl = rnd["loads"].get(load, {})
                mine, theirs = (rl.get(key) or {}).get(pct), (rl.get(peer) or {}).get(pct)
                if mine and theirs:
                    ratios.append(mine / theirs)
            if ratios:
                parts.append(f"{pct[:3]} against {s['labels'][peer]}'s " + ", ".join(f"{x:.2f}×" for x in ratios))
    if parts:
        w(f"{s['labels'][key]}, per round: " + "; ".join(parts) + ".")
        w("")
