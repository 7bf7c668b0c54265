#!/usr/bin/env python3
"""drover's benchmark harness: drover side by side with Gunicorn and Circus.

Run it through `bench/run`, which sets up the peers first (see bench/README.md).

    bench/run                 full run (about 10 minutes), regenerates docs/benchmarks.md
    bench/run --quick         every scenario once, short windows (about 2 minutes);
                              the report goes to bench/results/<run>/benchmarks.md only
    bench/run --only startup,kill_worker
    bench/run --report-only [bench/results/<run>]
"""

import argparse
import datetime
import json
import os
import platform
import re
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
from harness import Subject, Unavailable, now, ms  # noqa: E402

SUBJECTS = {
    s.key: s
    for s in [
        Subject("drover-hello", "drover + hello", "drover", "hello"),
        Subject("drover-wsgi", "drover + drover_wsgi", "drover", "wsgi"),
        Subject("gunicorn", "Gunicorn (sync)", "gunicorn", "wsgi"),
        Subject("circus-hello", "Circus + hello", "circus", "hello"),
        Subject("circus-wsgi", "Circus + drover_wsgi", "circus", "wsgi"),
        Subject("alone-hello", "hello alone", "alone", "hello"),
    ]
}
SUPERVISED = ["drover-hello", "drover-wsgi", "gunicorn", "circus-hello", "circus-wsgi"]


class Ctx:
    def __init__(self, args, outdir):
        self.quick = args.quick
        self.reps = args.reps or (1 if args.quick else 3)
        self.outdir = outdir
        self.logs = outdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.results = {"meta": {}, "scenarios": {}}
        self.commands = {}
        self.runs = 0

    def log_path(self, scenario, subject, extra=""):
        self.runs += 1
        return self.logs / f"{self.runs:04d}-{scenario}-{subject}{extra}.log"

    def note_command(self, scenario, key, cmd):
        """Keeps the first command of each kind, with the repository as "."
        and temporary directories as $TMP."""
        cmd = cmd.replace(str(H.ROOT) + "/", "").replace(str(H.ROOT), ".")
        cmd = re.sub(r"/tmp/bench-[\w-]+", "$TMP", cmd)
        cmd = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", cmd)
        cmd = re.sub(r"port = \d+", "port = PORT", cmd)
        self.commands.setdefault(scenario, {}).setdefault(key, cmd)

    def save(self):
        self.results["commands"] = self.commands
        (self.outdir / "results.json").write_text(json.dumps(self.results, indent=1, default=str))


def say(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def stats(values):
    v = sorted(x for x in values if x is not None)
    if not v:
        return {"n": 0, "median": None, "min": None, "max": None, "missing": len(values)}
    mid = len(v) // 2
    med = v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2
    return {"n": len(v), "median": med, "min": v[0], "max": v[-1], "missing": len(values) - len(v)}


def cmd_of(run):
    cmd = shlex.join(run.argv)
    if run.subject.kind == "circus":
        # The command is only circusd: show the config it was given.
        ini = Path(run.argv[-1])
        if ini.exists():
            cmd += "\n# with $TMP/circus.ini:\n" + "\n".join("#   " + x for x in ini.read_text().splitlines())
    return cmd


# --------------------------------------------------------------------------
# Setup checks


def git(*args):
    try:
        return subprocess.run(["git", *args], cwd=H.ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def version_of(argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (p.stdout + p.stderr).strip().splitlines()[0]
    except Exception as e:  # noqa: BLE001
        return f"unknown ({e})"


def machine_meta(ctx):
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = H.status_fields("self")  # placeholder to keep the helper warm
    del mem
    memtotal = ""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                memtotal = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    dirty = git("status", "--porcelain", "--", "src", "workers", "Cargo.toml", "Cargo.lock")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "quick" if ctx.quick else "full",
        "reps": ctx.reps,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": memtotal,
        "kernel": platform.release(),
        "os": version_of(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "drover_rev": (git("rev-parse", "--short=10", os.environ["BENCH_REV"]) + " (bench/run --rev)")
        if os.environ.get("BENCH_REV") else
        git("rev-parse", "--short=10", "HEAD") + (" (working tree with uncommitted changes)" if dirty else ""),
        "rustc": version_of(["rustc", "--version"]),
        "gunicorn": version_of([str(H.VENV / "bin" / "gunicorn"), "--version"]),
        "circus": version_of([str(H.VENV_PY), "-c", "import circus; print('circus', circus.__version__)"]),
        "wrk": version_of(["sh", "-c", "wrk -v 2>&1 | head -1"]),
        "python": version_of([str(H.VENV_PY), "--version"]),
        "strace": version_of(["strace", "-V"]) if H.which("strace") else None,
    }
    ctx.results["meta"] = meta


def check_wsgi_worker(ctx):
    """Finds out whether the Python WSGI worker runs today, and how drover
    should wait for it (READY=1 or on spawn). Marks the wsgi subjects."""
    reason = None
    if not H.WSGI_WORKER.exists():
        reason = f"{H.WSGI_WORKER.relative_to(H.ROOT)} does not exist yet"
    else:
        for mode in ("notify", "spawn"):
            s = SUBJECTS["drover-wsgi"]
            s.ready_mode = mode
            tmp = H.fresh_tmp(quiet=False)
            port = H.free_port()
            try:
                with s.start(1, port, tmp, ctx.log_path("check", "drover-wsgi", f"-{mode}"),
                             settings=["boot_timeout=10s"]) as run:
                    if mode == "notify":
                        hit = run.wait_line(r"all 1 workers ready", 12)
                        if not hit:
                            reason = "no READY=1 within 10 s: " + " | ".join(run.output(last=3))
                            continue
                    ok = H.get_until_ok(port, 10)
                    if ok and ok[1]["pid"]:
                        reason = None
                        break
                    reason = "no 200 with X-Worker-Pid on / within 10 s: " + " | ".join(run.output(last=3))
            except Exception as e:  # noqa: BLE001
                reason = f"cannot start: {e}"
    for key in ("drover-wsgi", "circus-wsgi"):
        SUBJECTS[key].unavailable = reason
    ctx.results["meta"]["wsgi_worker"] = {
        "available": reason is None,
        "reason": reason,
        "drover_ready_mode": SUBJECTS["drover-wsgi"].ready_mode if reason is None else None,
    }
    say("WSGI worker:", "available (ready=%s)" % SUBJECTS["drover-wsgi"].ready_mode if reason is None
        else f"not available ({reason})")


def throughput_app(ctx):
    """The WSGI app of the throughput scenario: workers/python/examples/example_app.py
    when it exists and answers / with 200 under Gunicorn, else bench_app."""
    ex = H.EXAMPLES / "example_app.py"
    if not ex.exists():
        return "bench_app:app", "workers/python/examples/example_app.py does not exist"
    s = Subject("probe", "probe", "gunicorn", "wsgi")
    s.app = "example_app:app"
    tmp = H.fresh_tmp(quiet=False)
    port = H.free_port()
    try:
        with s.start(1, port, tmp, ctx.log_path("check", "example-app"),
                     env_extra={"PYTHONPATH": f"{H.APPS}:{H.EXAMPLES}"}) as run:
            ok = H.get_until_ok(port, 10)
            if ok:
                return "example_app:app", None
            return "bench_app:app", "example_app:app did not answer / with 200 under Gunicorn"
    except Exception as e:  # noqa: BLE001
        return "bench_app:app", f"example_app:app: {e}"


# --------------------------------------------------------------------------
# Scenarios


def startup_methods(s, n):
    """Which measurements a start-up run of s takes: runs of kind "out" read
    the output only (drover's own line, the workers' ready lines), runs of
    kind "pids" load the subject with the distinct-pid probe."""
    kinds = []
    if s.kind in ("drover", "circus"):
        kinds.append("out")
    if s.worker == "wsgi" and s.kind != "circus" and n <= 128:
        kinds.append("pids")
    return kinds


def sc_startup(ctx):
    """Start-up to all N workers serving, then idle SIGTERM to exit."""
    rows = []
    for key in SUPERVISED:
        s = SUBJECTS[key]
        if s.unavailable:
            rows.append({"subject": key, "unavailable": s.unavailable})
            continue
        if ctx.quick:  # a smoke pass: the large counts for drover + hello only
            ns = [4, 32, 128] if key == "drover-hello" else [4, 32]
        else:
            ns = [4, 32, 128] + ([1024] if key == "drover-hello" else [])
        for n in ns:
            # Python workers at N=128 take seconds per run on 2 cores: fewer runs.
            big = n >= 1024 or (n >= 128 and s.worker == "wsgi")
            reps = max(1, min(ctx.reps, 2)) if big else ctx.reps
            samples = []
            for kind in startup_methods(s, n):
                for rep in range(reps):
                    samples.append(startup_once(ctx, s, n, kind))
            row = {
                "subject": key, "n": n, "samples": samples,
                "log_ms": stats([x.get("log_ms") for x in samples if x["kind"] == "out"]),
                "self_ms": stats([x.get("self_ms") for x in samples if x["kind"] == "out"]),
                "lines_ms": stats([x.get("lines_ms") for x in samples if x["kind"] == "out"]),
                "pids_ms": stats([x.get("pids_ms") for x in samples if x["kind"] == "pids"]),
                "first_ms": stats([x.get("first_ms") for x in samples if x["kind"] == "pids"]),
                "stop_ms": stats([x.get("stop_ms") for x in samples]),
                "stop_all_ms": stats([x.get("stop_all_ms") for x in samples]),
                "errors": [x["error"] for x in samples if x.get("error")],
            }
            for k in ("log_ms", "lines_ms", "pids_ms", "first_ms", "self_ms"):
                if row[k]["n"] == 0 and (s.kind != "drover" or k not in ("log_ms", "self_ms")):
                    del row[k]
            say(f"startup {key} N={n}: log {med(row.get('log_ms'))}, lines {med(row.get('lines_ms'))}, "
                f"pids {med(row.get('pids_ms'))} ms; stop {med(row['stop_ms'])} ms", row["errors"][:1] or "")
            rows.append(row)
    return {"rows": rows}


def med(st):
    return st.get("median") if st else None


def startup_once(ctx, s, n, kind):
    tmp = H.fresh_tmp()
    port = H.free_port()
    out = {"kind": kind}
    timeout = 90 if n >= 128 else 30
    try:
        with s.start(n, port, tmp, ctx.log_path("startup", s.key, f"-{n}-{kind}")) as run:
            ctx.note_command("startup", s.key, cmd_of(run))
            if kind == "out":
                t = run.wait_distinct(H.WORKER_READY, n, timeout)
                if t is None:
                    raise Unavailable(f"fewer than {n} worker 'ready' lines: " + " | ".join(run.output(last=3)))
                out["lines_ms"] = ms(t - run.t0)
                if s.kind == "drover":
                    hit = run.wait_line(r"all (\d+) workers ready ([\d.]+) ms after start", timeout)
                    if not hit:
                        raise Unavailable("no 'all N workers ready' line: " + " | ".join(run.output(last=3)))
                    ok = H.get_until_ok(port, 5)
                    if not ok:
                        raise Unavailable("no 200 after 'all N workers ready'")
                    out["log_ms"] = ms(ok[0] - run.t0)
                    out["log_seen_ms"] = ms(hit[0] - run.t0)
                    out["self_ms"] = float(hit[1].group(2))
            else:
                r = H.distinct_pids(port, n, timeout, stop=run.exited)
                out["first_ms"] = ms(r["t_first"] - run.t0) if r["t_first"] else None
                if r["t_all"] is None:
                    raise Unavailable(f"only {len(r['pids'])} of {n} distinct workers answered in {timeout}s")
                out["pids_ms"] = ms(r["t_all"] - run.t0)
            time.sleep(0.3)
            ws = run.workers()
            watch = H.PidWatch(ws)
            t = now()
            run.signal(signal.SIGTERM)
            ex = run.wait_exit(t, 45)
            gone = watch.wait_all(t, (ex or 45) + 2)
            watch.kill_survivors()
            watch.close()
            out["stop_ms"] = ms(ex)
            out["stop_all_ms"] = ms(max((g for g in gone.values() if g is not None), default=0)) \
                if all(g is not None for g in gone.values()) else None
            out["survivors"] = sum(1 for g in gone.values() if g is None)
            out["exit_status"] = run.p.returncode
            out["workers"] = len(ws)
    except Unavailable as e:
        out["error"] = str(e)
    return out


def sc_stop_inflight(ctx, how):
    """SIGTERM (how="term") or Ctrl+C (how="int": SIGINT to the process group)
    with a 1 s request in flight."""
    rows = []
    for key in SUPERVISED:
        s = SUBJECTS[key]
        if s.unavailable:
            rows.append({"subject": key, "unavailable": s.unavailable})
            continue
        samples = [stop_inflight_once(ctx, s, how) for _ in range(ctx.reps)]
        row = {
            "subject": key, "samples": samples,
            "exit_ms": stats([x.get("exit_ms") for x in samples]),
            "slow_done_ms": stats([x.get("slow_done_ms") for x in samples]),
            "slow_ok": sum(1 for x in samples if x.get("slow_outcome") == "ok"),
            "slow_outcomes": sorted({x.get("slow_outcome") for x in samples if x.get("slow_outcome")}),
            "new_outcomes": sorted({x.get("new_outcome") for x in samples if x.get("new_outcome")}),
            "new_ms": stats([x.get("new_ms") for x in samples]),
            "cleanups": [f"{x.get('cleanups')}/{x.get('workers')}" for x in samples if "workers" in x],
            "exit_statuses": sorted({x.get("exit_status") for x in samples if "exit_status" in x}, key=str),
            "survivors": sum(x.get("survivors", 0) for x in samples),
            "errors": [x["error"] for x in samples if x.get("error")],
        }
        say(f"stop[{how}] {key}: exit {row['exit_ms']['median']} ms, slow {row['slow_outcomes']}, "
            f"new {row['new_outcomes']}, cleanups {row['cleanups']}", row["errors"][:1] or "")
        rows.append(row)
    return {"rows": rows}


def stop_inflight_once(ctx, s, how):
    tmp = H.fresh_tmp()
    port = H.free_port()
    out = {}
    try:
        with s.start(2, port, tmp, ctx.log_path(f"stop-{how}", s.key)) as run:
            ctx.note_command(f"stop_{how}", s.key, cmd_of(run))
            s.wait_ready(run, 2, port, 60)
            time.sleep(0.2)
            H.reset_cleanup(tmp)
            slow = H.send_slow_request(run, port, 1000)
            ws = run.workers()
            watch = H.PidWatch(ws)
            t = now()
            if how == "term":
                run.signal(signal.SIGTERM)
            else:
                run.signal_group(signal.SIGINT)
            new = H.InFlight(port, "/", timeout=10, connect_timeout=10)
            ex = run.wait_exit(t, 45)
            slow.join(45)
            new.join(15)
            gone = watch.wait_all(t, (ex or 45) + 2)
            watch.kill_survivors()
            watch.close()
            out["exit_ms"] = ms(ex)
            out["exit_status"] = run.p.returncode
            out["slow_outcome"] = slow.result["outcome"] if slow.result else "no result"
            out["slow_done_ms"] = ms(slow.t_end - t) if slow.t_end else None
            out["new_outcome"] = new.result["outcome"] if new.result else "no result"
            out["new_ms"] = ms(new.t_end - t) if new.t_end else None
            out["workers"] = len(ws)
            out["cleanups"] = H.cleanup_count(tmp)
            out["survivors"] = sum(1 for g in gone.values() if g is None)
    except Unavailable as e:
        out["error"] = str(e)
    return out


def sc_kill_worker(ctx):
    """kill -9 of the only worker until a replacement answers."""
    rows = []
    for key in SUPERVISED:
        s = SUBJECTS[key]
        # Circus notices a dead process at its next check (check_delay, 5 s): fewer kills.
        kills = 1 if ctx.quick else (2 if s.kind == "circus" else 5)
        if s.unavailable:
            rows.append({"subject": key, "unavailable": s.unavailable})
            continue
        tmp = H.fresh_tmp()
        port = H.free_port()
        samples = []
        settings = ["respawn_reset_after=1s"] if s.kind == "drover" else []
        try:
            with s.start(1, port, tmp, ctx.log_path("kill-worker", s.key), settings=settings) as run:
                ctx.note_command("kill_worker", s.key, cmd_of(run))
                s.wait_ready(run, 1, port, 60)
                for _ in range(kills):
                    # Past respawn_reset_after: a worker that ran stably.
                    time.sleep(1.1)
                    ws = run.workers()
                    if len(ws) != 1:
                        samples.append({"error": f"{len(ws)} worker processes, expected 1"})
                        continue
                    victim = ws[0]
                    t = now()
                    os.kill(victim, signal.SIGKILL)
                    failed = 0
                    done = None
                    while now() - t < 15:
                        r = H.http_get(port, "/", timeout=15)
                        if r["outcome"] == "ok" and r["pid"] and r["pid"] != victim:
                            done = now() - t
                            break
                        failed += 1
                    samples.append({"replaced_ms": ms(done), "failed_requests": failed})
        except Unavailable as e:
            samples.append({"error": str(e)})
        row = {"subject": key, "samples": samples,
               "replaced_ms": stats([x.get("replaced_ms") for x in samples if "error" not in x]),
               "failed_requests": sum(x.get("failed_requests", 0) for x in samples),
               "errors": [x["error"] for x in samples if x.get("error")]}
        say(f"kill-worker {key}: {row['replaced_ms']['median']} ms", row["errors"][:1] or "")
        rows.append(row)
    return {"rows": rows}


def parse_strace_c(path):
    calls, per = 0, {}
    try:
        text = Path(path).read_text()
    except OSError:
        return None, {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and re.match(r"^[\d.]+$", parts[0]):
            name = parts[-1]
            try:
                n = int(parts[3])
            except ValueError:
                continue
            if name == "total":
                calls = n
            else:
                per[name] = n
    return calls, per


def sc_footprint(ctx):
    """The master's footprint while idle (2 workers)."""
    window = 1.0 if ctx.quick else 5.0
    rows = []
    for key in SUPERVISED:
        s = SUBJECTS[key]
        if s.unavailable:
            rows.append({"subject": key, "unavailable": s.unavailable})
            continue
        tmp = H.fresh_tmp()
        port = H.free_port()
        row = {"subject": key, "window_s": window}
        try:
            with s.start(2, port, tmp, ctx.log_path("footprint", s.key)) as run:
                ctx.note_command("footprint", s.key, cmd_of(run))
                s.wait_ready(run, 2, port, 60)
                time.sleep(1.0)
                st = H.status_fields(run.pid)
                row["rss_kb"] = int(st.get("VmRSS", "0 kB").split()[0])
                row["rss_anon_kb"] = int(st.get("RssAnon", "0 kB").split()[0])
                row["rss_file_kb"] = int(st.get("RssFile", "0 kB").split()[0])
                row["threads"] = int(st.get("Threads", "0"))
                row["pss_kb"] = H.smaps_rollup(run.pid).get("Pss")
                row["top_mappings_kb"] = H.rss_by_mapping(run.pid)
                row["text_kb"], row["text_rss_kb"] = H.text_mapping_kb(run.pid)
                c0 = H.context_switches(run.pid)
                time.sleep(window)
                c1 = H.context_switches(run.pid)
                row["wakeups"] = c1 - c0
                row["wakeups_per_s"] = round((c1 - c0) / window, 2)
                if H.which("strace"):
                    out = Path(tmp) / "strace.txt"
                    argv = ["strace", "-c", "-f", "-p", str(run.pid), "-o", str(out)]
                    ctx.note_command("footprint", "strace", "strace -c -f -p PID -o FILE  # for the window, then SIGINT")
                    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(window)
                    p.send_signal(signal.SIGINT)
                    p.wait(timeout=10)
                    calls, per = parse_strace_c(out)
                    row["syscalls"] = calls
                    row["syscalls_per_s"] = None if calls is None else round(calls / window, 2)
                    row["syscall_top"] = sorted(per.items(), key=lambda kv: -kv[1])[:6]
        except Unavailable as e:
            row["error"] = str(e)
        say(f"footprint {key}: rss {row.get('rss_kb')} kB, wake-ups/s {row.get('wakeups_per_s')}, "
            f"syscalls/s {row.get('syscalls_per_s')}", row.get("error", ""))
        rows.append(row)
    return {"rows": rows}


THROUGHPUT = [("drover-hello", 2), ("drover-hello", 4),
              ("circus-hello", 2), ("circus-hello", 4), ("gunicorn", 2), ("gunicorn", 4),
              ("drover-wsgi", 2), ("drover-wsgi", 4), ("circus-wsgi", 2), ("circus-wsgi", 4)]


def sc_throughput(ctx):
    secs = 1 if ctx.quick else 3
    app, why = throughput_app(ctx)
    samples = {}
    for rep in range(ctx.reps):
        for key, n in THROUGHPUT:
            s = SUBJECTS[key]
            if s.unavailable:
                continue
            saved = s.app
            s.app = app
            tmp = H.fresh_tmp()
            port = H.free_port()
            env = {"PYTHONPATH": f"{H.APPS}:{H.EXAMPLES}"}
            try:
                with s.start(n, port, tmp, ctx.log_path("throughput", key, f"-{n}"), env_extra=env) as run:
                    ctx.note_command("throughput", f"{key} -w {n}", cmd_of(run))
                    s.wait_ready(run, n, port, 60)
                    time.sleep(0.2)
                    r, cmd = H.run_wrk(port, 2, 50, secs)
                    ctx.note_command("throughput", "wrk", cmd.replace(str(port), "PORT"))
                    r.pop("raw", None) if r.get("rps") else None
            except Unavailable as e:
                r = {"error": str(e)}
            finally:
                s.app = saved
            samples.setdefault((key, n), []).append(r)
            say(f"throughput {key} w={n} rep {rep + 1}: {r.get('rps')} req/s, p99 {r.get('p99_ms')} ms, "
                f"errors {r.get('errors')}", r.get("error", ""))
    # drover's overhead: hello alone and drover + one hello, run in pairs
    # back to back, so that the machine's drift hits both alike; the order
    # alternates from pair to pair, so that whatever the second run of a
    # pair pays (sockets in TIME_WAIT, a warmer or busier machine) does not
    # always fall on the same side.
    pairs = []
    for i in range(1 if ctx.quick else 4):
        pair = {}
        order = ("alone-hello", "drover-hello") if i % 2 == 0 else ("drover-hello", "alone-hello")
        for key in order:
            s = SUBJECTS[key]
            tmp = H.fresh_tmp()
            port = H.free_port()
            try:
                with s.start(1, port, tmp, ctx.log_path("throughput", key, "-1")) as run:
                    ctx.note_command("throughput", f"{key} -w 1", cmd_of(run))
                    s.wait_ready(run, 1, port, 60)
                    time.sleep(0.2)
                    r, _ = H.run_wrk(port, 2, 50, secs)
                    r.pop("raw", None) if r.get("rps") else None
            except Unavailable as e:
                r = {"error": str(e)}
            samples.setdefault((key, 1), []).append(r)
            pair[key] = r.get("rps")
        if pair.get("alone-hello") and pair.get("drover-hello"):
            pairs.append(pair["drover-hello"] / pair["alone-hello"])
        say(f"throughput pair {i + 1}: hello alone {pair.get('alone-hello')}, drover + hello {pair.get('drover-hello')} req/s")
    rows = []
    for key, n in [("alone-hello", 1), ("drover-hello", 1)] + THROUGHPUT:
        s = SUBJECTS[key]
        if s.unavailable:
            rows.append({"subject": key, "n": n, "unavailable": s.unavailable})
            continue
        sm = samples.get((key, n), [])
        rows.append({"subject": key, "n": n, "samples": sm,
                     "rps": stats([x.get("rps") for x in sm]),
                     "p99_ms": stats([x.get("p99_ms") for x in sm]),
                     "max_ms": stats([x.get("lat_max_ms") for x in sm]),
                     "errors": sum(x.get("errors") or 0 for x in sm)})
    return {"rows": rows, "wsgi_app": app, "wsgi_app_note": why, "seconds": secs,
            "overhead_pairs": [round(x, 4) for x in pairs], "overhead": stats(pairs)}


RELOAD_SUBJECTS = ["gunicorn", "drover-hello", "drover-wsgi", "circus-wsgi"]


# Log lines that show a reload (or upgrade) actually happened, per kind.
APPLIED = {
    ("drover", "reload"): r"reload applied",
    ("drover", "upgrade"): r"upgrade: new master pid (\d+) ready",
    ("gunicorn", "reload"): r"Hang up: Master",
    ("circus", "reload"): r"\breloaded\b",
}
NOT_IMPLEMENTED = r"not implemented"


def sc_reload(ctx):
    """Reload (and, for drover, upgrade) under load: 50 connections, five
    reloads, against the same run without reloads."""
    secs = 2.0 if ctx.quick else 8.0
    first, gap = (0.3, 0.3) if ctx.quick else (1.5, 1.2)
    schedule = [first + gap * i for i in range(5)]
    reps = 1
    rows = []
    for key in RELOAD_SUBJECTS:
        s = SUBJECTS[key]
        if s.unavailable:
            rows.append({"subject": key, "unavailable": s.unavailable})
            continue
        row = {"subject": key, "baseline": [], "reload": [], "upgrade": [], "schedule_s": schedule}
        tmp = H.fresh_tmp()
        port = H.free_port()
        ops = [("reload", signal.SIGHUP)] + ([("upgrade", signal.SIGUSR2)] if s.kind == "drover" else [])
        try:
            with s.start(2, port, tmp, ctx.log_path("reload", s.key)) as run:
                ctx.note_command("reload", s.key, cmd_of(run))
                s.wait_ready(run, 2, port, 60)
                time.sleep(0.3)
                for rep in range(reps):
                    for name, sig in [("baseline", None)] + ops:
                        if name != "baseline" and row.get(f"{name}_unavailable"):
                            continue
                        if name == "upgrade" and row["upgrade"]:
                            continue  # one upgrade run: the master changes
                        t_run = now()
                        res = reload_run(ctx, run, port, secs, schedule if sig else [], sig)
                        row[name].append(res)
                        if sig is None:
                            continue
                        # Did the reloads happen? (or does the master ignore the signal?)
                        lines = [text for t, text in run.lines if t >= t_run]
                        ni = [x for x in lines if re.search(NOT_IMPLEMENTED, x)]
                        if ni:
                            row[f"{name}_unavailable"] = "drover logs: " + re.split(r"\s(?:INFO|WARN|ERROR)\s", ni[0])[-1].strip()
                            row[name].pop()
                        rx = APPLIED.get((s.kind, name))
                        res["applied"] = sum(1 for x in lines if rx and re.search(rx, x))
                        res["log_excerpt"] = [x for x in lines if re.search(r"(?i)reload|upgrade|refused|rolled back|error", x)][:12]
                        if run.exited() and name != "upgrade":
                            raise Unavailable(f"the master exited during the {name} run")
                    if row.get("upgrade") and run.exited():
                        break
        except Unavailable as e:
            row["error"] = str(e)
        for name in ("baseline", "reload", "upgrade"):
            rs = row[name]
            row[f"{name}_summary"] = {
                "failed": stats([sum(v for k, v in r["outcomes"].items() if k != "ok") for r in rs]),
                "rps": stats([r["rps"] for r in rs]),
                "p99_ms": stats([r["lat_us"]["p99"] / 1000 for r in rs]),
                "max_ms": stats([r["lat_us"]["max"] / 1000 for r in rs]),
                "outcomes": _sum_outcomes(rs),
                "applied": [r.get("applied") for r in rs],
            }
        say(f"reload {key}: baseline p99 {row['baseline_summary']['p99_ms']['median']} ms, "
            f"reload p99 {row['reload_summary']['p99_ms']['median']} ms, failed {row['reload_summary']['failed']['median']}, "
            f"applied {row['reload_summary']['applied']}; upgrade failed {row['upgrade_summary']['failed']['median']} "
            f"applied {row['upgrade_summary']['applied']}",
            row.get("reload_unavailable", "") or row.get("error", ""))
        rows.append(row)
    return {"rows": rows, "seconds": secs, "schedule_s": schedule, "conns": 50}


def _sum_outcomes(rs):
    tot = {}
    for r in rs:
        for k, v in r["outcomes"].items():
            tot[k] = tot.get(k, 0) + v
    return tot


def reload_run(ctx, run, port, secs, schedule, sig):
    """One load-generator run, with sig sent to the (current) master at each
    time of schedule (seconds after the load started)."""
    lg, cmd = H.run_loadgen(port, secs)
    ctx.note_command("reload", "loadgen", cmd.replace(str(port), "PORT"))
    t_start = time.time()
    marks = []
    for at in schedule:
        delay = t_start + at - time.time()
        if delay > 0:
            time.sleep(delay)
        marks.append(time.time())
        try:
            os.kill(run.current_master(), sig)
        except OSError:
            pass
    res = H.finish_loadgen(lg, secs + 60)
    res["marks_s"] = [round(m - res["epoch"], 3) for m in marks]
    return res


def sc_kill_master(ctx):
    """SIGKILL of the master: how long do its workers live on, and do they
    still answer? All subjects at once, each timed from its own kill."""
    cap = 3.0 if ctx.quick else 17.0
    reps = 1
    rows = {k: {"subject": k, "samples": []} for k in SUPERVISED}
    for rep in range(reps):
        started = []
        try:
            for key in SUPERVISED:
                s = SUBJECTS[key]
                if s.unavailable:
                    rows[key]["unavailable"] = s.unavailable
                    continue
                tmp = H.fresh_tmp()
                port = H.free_port()
                run = s.start(2, port, tmp, ctx.log_path("kill-master", key))
                ctx.note_command("kill_master", key, cmd_of(run))
                started.append((key, run, port))
                try:
                    s.wait_ready(run, 2, port, 60)
                except Unavailable as e:
                    rows[key]["samples"].append({"error": str(e)})
                    started.pop()
                    run.stop()
            time.sleep(0.3)
            watches = []
            for key, run, port in started:
                ws = run.workers()
                w = H.PidWatch(ws)
                t = now()
                run.p.kill()
                # Watch at once (a pidfd tells when we look, not when it died).
                w.wait_all(t, 0.5)
                watches.append((key, run, port, w, t, len(ws)))
            t_end = max(t for *_, t, _ in watches) + cap if watches else now()
            for key, run, port, w, t, nw in watches:
                gone = w.wait_all(t, max(0.0, t_end - t))
                vals = list(gone.values())
                sample = {
                    "workers": nw,
                    "all_gone_ms": ms(max(vals)) if vals and all(v is not None for v in vals) else None,
                    "survivors_at_cap": sum(1 for v in vals if v is None),
                    "cap_s": round(t_end - t, 1),
                }
                # Only now (a request would wake the workers up): do orphans still serve?
                r = H.http_get(port, "/", timeout=1.0, connect_timeout=1.0)
                sample["answered_at_cap"] = r["outcome"] + (" (by an orphan)" if r["outcome"] == "ok" else "")
                w.kill_survivors()
                w.close()
                rows[key]["samples"].append(sample)
        finally:
            for key, run, port in started:
                run.stop()
    out = []
    for key in SUPERVISED:
        row = rows[key]
        sm = row["samples"]
        row["all_gone_ms"] = stats([x.get("all_gone_ms") for x in sm if "error" not in x])
        row["survivors"] = sum(x.get("survivors_at_cap", 0) for x in sm)
        row["answered"] = sorted({x.get("answered_at_cap") for x in sm if x.get("answered_at_cap")})
        row["errors"] = [x["error"] for x in sm if x.get("error")]
        say(f"kill-master {key}: gone {row['all_gone_ms']['median']} ms, survivors {row['survivors']}, "
            f"answered {row['answered']}", row.get("unavailable", ""))
        out.append(row)
    return {"rows": out, "cap_s": cap}


def diagnose_once(ctx, s, n):
    """One untraced start-up and stop of drover + hello with n workers: CPU
    at ready (schedstat), the spawn loop (drover's timestamps), stop time and
    stop CPU (wait4 rusage)."""
    tmp = H.fresh_tmp()
    port = H.free_port()
    with s.start(n, port, tmp, ctx.log_path("diagnose-cpu", s.key, f"-{n}")) as run:
        hit = run.wait_line(r"all (\d+) workers ready ([\d.]+) ms after start", 90)
        ws = run.workers()
        master = H.cpu_ns(run.pid) or 0
        workers = sum(H.cpu_ns(p) or 0 for p in ws)
        # The spawn loop, from drover's own timestamps.
        stamps = []
        for _, text in list(run.lines):
            m = re.match(r"(\S+)Z\s+INFO worker \d+ \(pid \d+\) spawned", text)
            if m:
                stamps.append(datetime.datetime.fromisoformat(m.group(1)))
        spawn_ms = (stamps[-1] - stamps[0]).total_seconds() * 1000 if len(stamps) > 1 else None
        time.sleep(0.3)
        t = now()
        run.signal(signal.SIGTERM)
        r, _, _ = select.select([run.pidfd], [], [], 60)
        stop_ms = (now() - t) * 1000 if r else None
        total_cpu = None
        if r:
            # wait4: the master's rusage includes every worker it reaped.
            _, status, ru = os.wait4(run.pid, 0)
            run.p.returncode = os.waitstatus_to_exitcode(status)
            total_cpu = (ru.ru_utime + ru.ru_stime) * 1000
        at_ready = (master + workers) / 1e6
        return {
            "wall_ms": float(hit[1].group(2)) if hit else None,
            "master_cpu_ms": round(master / 1e6, 2),
            "workers_cpu_ms": round(workers / 1e6, 2),
            "per_worker_ms": round(workers / 1e6 / max(1, len(ws)), 3),
            "master_per_worker_ms": round(master / 1e6 / n, 3),
            "spawn_loop_ms": round(spawn_ms, 2) if spawn_ms is not None else None,
            "spawn_each_ms": round(spawn_ms / (n - 1), 3) if spawn_ms is not None else None,
            "stop_ms": round(stop_ms, 2) if stop_ms is not None else None,
            "stop_cpu_ms": round(total_cpu - at_ready, 2) if total_cpu is not None else None,
            "cores": os.cpu_count(),
        }


def sc_diagnose(ctx):
    """Evidence for the report. (1) CPU time (schedstat) of drover's master and
    of its workers at the moment all N are ready, untraced: what the start-up
    costs and who pays. (2) strace of the master alone (no -f) during a
    start-up: its system calls by count and time, and its longest gaps."""
    out = {"cpu": {}}
    s = SUBJECTS["drover-hello"]
    for n in (4, 128, 1024):
        runs = [diagnose_once(ctx, s, n) for _ in range(ctx.reps if n < 1024 else 1)]
        # The median of each figure over the runs (the machine is shared).
        d = {k: stats([r.get(k) for r in runs])["median"] for k in runs[0] if k != "cores"}
        d["cores"] = os.cpu_count()
        d["runs"] = len(runs)
        out["cpu"][str(n)] = d
    out["exec_cpu_ms"] = {
        "/bin/true": H.exec_cpu_ms(["/bin/true"]),
        "hello (exits at once: no LISTEN_FDS)": H.exec_cpu_ms([str(H.HELLO)]),
        "drover check (exec, arguments, config)": H.exec_cpu_ms(
            [str(H.DROVER), "check", "-w", "4", "-b", "127.0.0.1:1", "--set", "ready=notify", "--", str(H.HELLO)]),
    }
    if not H.which("strace"):
        out["strace"] = "strace not installed"
        return out
    for n in (4, 128):
        tmp = H.fresh_tmp()
        port = H.free_port()
        trace = Path(tmp) / "trace.txt"
        argv = ["strace", "-ttt", "-T", "-s", "256", "-o", str(trace)] + s.argv(n, port, tmp)
        ctx.note_command("diagnose", f"N={n}", shlex.join(argv).replace(str(port), "PORT").replace(str(trace), "trace.txt"))
        run = H.Running(s, argv, H.base_env(tmp), log_path=ctx.log_path("diagnose", s.key, f"-{n}"))
        try:
            hit = run.wait_line(r"all (\d+) workers ready ([\d.]+) ms after start", 60)
            kids = [p for p, pp in H.process_table().items() if pp == run.pid]
            t = now()
            for k in kids:  # drover itself, under strace
                os.kill(k, signal.SIGTERM)
            run.wait_exit(t, 30)
        finally:
            run.stop()
        out[f"n{n}"] = summarize_trace(trace, hit[1].group(2) if hit else None)
    return out


def summarize_trace(path, self_ms):
    """Time per syscall and the largest gaps (user-space time) of a master's
    strace -ttt -T from its exec to its 'all N workers ready' log line."""
    rx = re.compile(r"^(\d+\.\d+) (\w+)\((.*)\) += (.*?)(?: <([\d.]+)>)?$")
    calls = []
    for line in Path(path).read_text(errors="replace").splitlines():
        m = rx.match(line)
        if m:
            calls.append((float(m.group(1)), m.group(2), m.group(3)[:60], float(m.group(5) or 0)))
    if not calls:
        return {}
    t0 = calls[0][0]
    end = None
    for t, name, args, dur in calls:
        if name == "write" and "workers ready" in args:
            end = t
            break
    upto = [c for c in calls if end is None or c[0] <= end]
    per = {}
    for t, name, args, dur in upto:
        n, total = per.get(name, (0, 0.0))
        per[name] = (n + 1, total + dur)
    gaps = []
    for a, b in zip(upto, upto[1:]):
        gaps.append((round((b[0] - (a[0] + a[3])) * 1000, 3), a[1], a[2], b[1]))
    gaps.sort(reverse=True)
    return {
        "self_reported_ms": self_ms,
        "ready_line_found": end is not None,
        "traced_ms": round(((end or upto[-1][0]) - t0) * 1000, 3),
        "syscalls": len(upto),
        "calls": sorted(((k, v[0], round(v[1] * 1000, 3)) for k, v in per.items()), key=lambda x: -x[1]),
        "by_time_ms": sorted(((k, v[0], round(v[1] * 1000, 3)) for k, v in per.items()), key=lambda x: -x[2])[:8],
        "largest_gaps_ms": gaps[:5],
    }


def sc_observe(ctx):
    """The admin endpoint's cost (drover + hello only): with admin_bind set and
    N = 128 workers, (1) wake-ups of the idle, unscraped master over a window;
    (2) the master's CPU time per GET /metrics, over a series of scrapes."""
    s = SUBJECTS["drover-hello"]
    window = 1.0 if ctx.quick else 5.0
    n, scrapes = 128, 50 if ctx.quick else 200
    tmp = H.fresh_tmp()
    port, admin = H.free_port(), H.free_port()
    row = {"workers": n, "window_s": window, "scrapes": scrapes}
    try:
        with s.start(n, port, tmp, ctx.log_path("observe", s.key),
                     settings=(f'admin_bind="127.0.0.1:{admin}"',)) as run:
            ctx.note_command("observe", s.key, cmd_of(run))
            s.wait_ready(run, n, port, 120)
            first = H.http_get(admin, "/metrics")
            if first["outcome"] != "ok":
                raise Unavailable(f"GET /metrics: {first['outcome']}")
            time.sleep(1.0)
            c0 = H.context_switches(run.pid)
            time.sleep(window)
            row["idle_wakeups"] = H.context_switches(run.pid) - c0
            cpu0 = H.cpu_ns(run.pid)
            t0 = time.monotonic()
            for _ in range(scrapes):
                r = H.http_get(admin, "/metrics")
                if r["outcome"] != "ok":
                    raise Unavailable(f"GET /metrics: {r['outcome']}")
            row["scrape_wall_ms"] = round((time.monotonic() - t0) * 1000 / scrapes, 3)
            row["scrape_cpu_ms"] = round((H.cpu_ns(run.pid) - cpu0) / 1e6 / scrapes, 3)
    except Unavailable as e:
        row["error"] = str(e)
    say(f"observe: {n} workers, idle wake-ups {row.get('idle_wakeups')} in {window} s, "
        f"scrape CPU {row.get('scrape_cpu_ms')} ms", row.get("error", ""))
    return {"rows": [row]}


# --------------------------------------------------------------------------
# Preload: drover's template against exec'd workers and Gunicorn's --preload


PRELOAD_SUBJECTS = [
    # key, label, kind, extra settings (drover) or options (Gunicorn)
    ("drover-wsgi", "drover + drover_wsgi", "drover", []),
    ("drover-preload", "drover + drover_wsgi, preload = true", "drover", ["preload=true"]),
    ("gunicorn", "Gunicorn (sync)", "gunicorn", []),
    ("gunicorn-preload", "Gunicorn (sync) --preload", "gunicorn", ["--preload"]),
]


def django_project():
    """A default Django project (django-admin startproject benchsite), with
    ALLOWED_HOSTS = ["*"] so that the probes' Host header is accepted.
    Returns its directory (for PYTHONPATH)."""
    d = Path(H.fresh_tmp(quiet=False)) / "django"
    d.mkdir()
    subprocess.run([str(H.VENV / "bin" / "django-admin"), "startproject", "benchsite", str(d)],
                   check=True, capture_output=True, timeout=60)
    settings = d / "benchsite" / "settings.py"
    settings.write_text(settings.read_text().replace("ALLOWED_HOSTS = []", 'ALLOWED_HOSTS = ["*"]'))
    return d


def preload_subject(key, label, kind, extra, app):
    s = Subject(key, label, kind, "wsgi")
    s.app = app
    s.extra = list(extra)
    s.ready_mode = "notify"
    return s


def tree_pss_kb(root):
    """Total PSS (kB) of root and every descendant: master, template, workers."""
    return sum(H.smaps_rollup(p).get("Pss", 0) for p in [root] + H.descendants(root))


def template_pid(run):
    hit = run.wait_line(r"template of generation \d+ \(pid (\d+)\) ready to fork", 0)
    return int(hit[1].group(1)) if hit else None


def preload_startup_once(ctx, s, n, env_extra, app_key, warm):
    """Start, time to n distinct workers answering; with `warm`, then 200
    requests and the total PSS; SIGTERM."""
    tmp = H.fresh_tmp()
    port = H.free_port()
    out = {}
    timeout = 240 if n >= 128 else 90
    try:
        with s.start(n, port, tmp, ctx.log_path("preload", f"{app_key}-{s.key}", f"-{n}"),
                     env_extra=env_extra) as run:
            ctx.note_command("preload", f"{app_key} {s.key}", cmd_of(run))
            r = H.distinct_pids(port, n, timeout, stop=run.exited)
            if r["t_all"] is None:
                raise Unavailable(f"only {len(r['pids'])} of {n} distinct workers answered in {timeout}s: "
                                  + " | ".join(run.output(last=3)))
            out["pids_ms"] = ms(r["t_all"] - run.t0)
            out["first_ms"] = ms(r["t_first"] - run.t0) if r["t_first"] else None
            if s.kind == "drover":
                hit = run.wait_line(r"all (\d+) workers ready ([\d.]+) ms after start", 5)
                out["log_ms"] = float(hit[1].group(2)) if hit else None
            if warm:
                for _ in range(200):
                    H.http_get(port, "/", timeout=10)
                time.sleep(0.5)
                out["pss_kb"] = tree_pss_kb(run.pid)
                out["processes"] = 1 + len(H.descendants(run.pid))
            run.signal(signal.SIGTERM)
            run.wait_exit(now(), 60)
    except Unavailable as e:
        out["error"] = str(e)
    return out


def preload_kill_once(ctx, s, env_extra, app_key, kills):
    """One worker; kill -9 it (after 1.1 s, past respawn_reset_after=1s for
    drover) until a 200 from a new pid, `kills` times."""
    tmp = H.fresh_tmp()
    port = H.free_port()
    samples = []
    settings = ["respawn_reset_after=1s"] if s.kind == "drover" else []
    try:
        with s.start(1, port, tmp, ctx.log_path("preload-kill", f"{app_key}-{s.key}"),
                     settings=settings, env_extra=env_extra) as run:
            ctx.note_command("preload_kill", f"{app_key} {s.key}", cmd_of(run))
            s.wait_ready(run, 1, port, 90)
            for _ in range(kills):
                time.sleep(1.1)
                template = template_pid(run)
                ws = [p for p in run.workers() if p != template and H.proc_stat(p)
                      and H.proc_stat(p)[1] == run.pid]
                if len(ws) != 1:
                    samples.append({"error": f"{len(ws)} worker processes, expected 1"})
                    continue
                victim = ws[0]
                t = now()
                os.kill(victim, signal.SIGKILL)
                done = None
                failed = 0
                while now() - t < 30:
                    r = H.http_get(port, "/", timeout=30)
                    if r["outcome"] == "ok" and r["pid"] and r["pid"] != victim:
                        done = now() - t
                        break
                    failed += 1
                samples.append({"replaced_ms": ms(done), "failed_requests": failed})
            run.signal(signal.SIGTERM)
            run.wait_exit(now(), 60)
    except Unavailable as e:
        samples.append({"error": str(e)})
    return samples


def sc_preload(ctx):
    """drover with and without preload, Gunicorn with and without --preload,
    on a Flask-sized app and a default Django project: time to N workers
    serving, kill -9 to a replacement serving, total PSS after a warm-up."""
    if SUBJECTS["drover-wsgi"].unavailable:
        return {"rows": [], "unavailable": SUBJECTS["drover-wsgi"].unavailable}
    apps = [("flask", "flask_app:app", {}),
            ("django", "django_app:app", {"PYTHONPATH": f"{H.APPS}:{django_project()}"})]
    ns = [4, 32] if ctx.quick else [4, 32, 128]
    rows = []
    for app_key, app, env_extra in apps:
        for key, label, kind, extra in PRELOAD_SUBJECTS:
            s = preload_subject(key, label, kind, extra, app)
            for n in ns:
                reps = 1 if (ctx.quick or n >= 128) else min(ctx.reps, 2)
                samples = [preload_startup_once(ctx, s, n, env_extra, app_key, warm=True)
                           for _ in range(reps)]
                row = {"app": app_key, "subject": key, "label": label, "n": n, "samples": samples,
                       "pids_ms": stats([x.get("pids_ms") for x in samples]),
                       "log_ms": stats([x.get("log_ms") for x in samples]),
                       "pss_kb": stats([x.get("pss_kb") for x in samples]),
                       "errors": [x["error"] for x in samples if x.get("error")]}
                say(f"preload {app_key} {key} N={n}: serving in {med(row['pids_ms'])} ms, "
                    f"PSS {med(row['pss_kb'])} kB", row["errors"][:1] or "")
                rows.append(row)
            kills = 1 if ctx.quick else 3
            samples = preload_kill_once(ctx, s, env_extra, app_key, kills)
            row = {"app": app_key, "subject": key, "label": label, "n": "kill", "samples": samples,
                   "replaced_ms": stats([x.get("replaced_ms") for x in samples if "error" not in x]),
                   "failed_requests": sum(x.get("failed_requests", 0) for x in samples),
                   "errors": [x["error"] for x in samples if x.get("error")]}
            say(f"preload {app_key} {key} kill -9: replacement serving in {med(row['replaced_ms'])} ms",
                row["errors"][:1] or "")
            rows.append(row)
    return {"rows": rows}


def sc_accesslog(ctx):
    """drover + drover_wsgi with its access log on (Gunicorn's combined format,
    to a file) against Gunicorn's gthread worker, with and without its access
    log: wrk with keep-alive, 2 workers of 4 threads each."""
    secs = 1 if ctx.quick else 3
    app, why = throughput_app(ctx)
    fmt = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
    gthread = ["--worker-class", "gthread", "--threads", "4"]
    variants = [
        ("drover-wsgi", "drover + drover_wsgi, no access log", "drover", [], False),
        ("drover-wsgi-log", "drover + drover_wsgi, access log", "drover", [], True),
        ("gunicorn-gthread", "Gunicorn gthread, no access log", "gunicorn", gthread, False),
        ("gunicorn-gthread-log", "Gunicorn gthread, access log", "gunicorn", gthread, True),
    ]
    samples = {}
    for rep in range(ctx.reps):
        for key, label, kind, extra, logged in variants:
            s = Subject(key, label, kind, "wsgi")
            s.app = app
            tmp = H.fresh_tmp()
            port = H.free_port()
            log = str(Path(tmp) / "access.log")
            s.extra = list(extra) + (["--access-logfile", log, "--access-logformat", fmt]
                                     if logged and kind == "gunicorn" else [])
            s.worker_extra = ["--threads", "4"] + (["--access-logfile", log] if logged else [])
            try:
                with s.start(2, port, tmp, ctx.log_path("accesslog", key, ""),
                             env_extra={"PYTHONPATH": f"{H.APPS}:{H.EXAMPLES}"}) as run:
                    ctx.note_command("accesslog", key, cmd_of(run))
                    s.wait_ready(run, 2, port, 60)
                    time.sleep(0.2)
                    r, cmd = H.run_wrk(port, 2, 50, secs)
                    ctx.note_command("accesslog", "wrk", cmd.replace(str(port), "PORT"))
                    r.pop("raw", None) if r.get("rps") else None
                    lines = sum(1 for _ in open(log)) if logged and os.path.exists(log) else None
                    r["log_lines"] = lines
            except Unavailable as e:
                r = {"error": str(e)}
            samples.setdefault(key, []).append(r)
            say(f"accesslog {key} rep {rep + 1}: {r.get('rps')} req/s, p99 {r.get('p99_ms')} ms, "
                f"errors {r.get('errors')}, log lines {r.get('log_lines')}", r.get("error", ""))
    rows = []
    for key, label, _, _, _ in variants:
        sm = samples.get(key, [])
        rows.append({"subject": key, "label": label, "samples": sm, "rps": stats([x.get("rps") for x in sm]),
                     "p99_ms": stats([x.get("p99_ms") for x in sm])})
    by = {r["subject"]: r["rps"] and r["rps"].get("median") for r in rows}
    ratio = None
    if by.get("drover-wsgi-log") and by.get("gunicorn-gthread"):
        ratio = by["drover-wsgi-log"] / by["gunicorn-gthread"]
    say(f"accesslog: drover_wsgi with its access log / Gunicorn gthread without: {ratio and round(ratio, 2)}x "
        "(target >= 2x)")
    return {"rows": rows, "wsgi_app": app, "wsgi_app_note": why, "seconds": secs,
            "ratio_log_vs_gthread": ratio}


SCENARIOS = [
    ("startup", sc_startup),
    ("stop_term", lambda ctx: sc_stop_inflight(ctx, "term")),
    ("stop_int", lambda ctx: sc_stop_inflight(ctx, "int")),
    ("kill_worker", sc_kill_worker),
    ("footprint", sc_footprint),
    ("throughput", sc_throughput),
    ("reload", sc_reload),
    ("kill_master", sc_kill_master),
    ("diagnose", sc_diagnose),
    ("observe", sc_observe),
    ("preload", sc_preload),
    ("accesslog", sc_accesslog),
    ("peers", peers.sc_peers),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every scenario once, short windows")
    ap.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    ap.add_argument("--only", help="comma-separated scenarios: " + ",".join(n for n, _ in SCENARIOS))
    ap.add_argument("--report-only", nargs="?", const="latest", metavar="RESULTS_DIR",
                    help="regenerate the report from saved results")
    ap.add_argument("--merge", metavar="RESULTS_DIR",
                    help="run the --only scenarios again and replace them in an earlier run's results "
                         "(e.g. once a subject that was not available has appeared)")
    ap.add_argument("--docs", action="store_true",
                    help="write docs/benchmarks.md even for --quick/--only runs")
    args = ap.parse_args()

    if args.report_only:
        d = Path(args.report_only) if args.report_only != "latest" else (H.BENCH / "results" / "latest").resolve()
        res = json.loads((d / "results.json").read_text())
        to_docs = res["meta"].get("mode") == "full" or args.docs
        print(report.write(res, d, to_docs=to_docs))
        return

    if args.merge:
        if not args.only:
            sys.exit("--merge needs --only SCENARIOS")
        outdir = Path(args.merge).resolve()
        base = json.loads((outdir / "results.json").read_text())
        args.quick = base["meta"].get("mode") == "quick"
        ctx = Ctx(args, outdir)
        ctx.runs = len(list(ctx.logs.glob("*.log")))
        ctx.commands = base.get("commands", {})
        for name in args.only.split(","):
            ctx.commands.pop(name, None)
        machine_meta(ctx)
        new_meta = ctx.results["meta"]
        ctx.results = base
        ctx.results["meta"].setdefault("merged", []).append(
            {"scenarios": args.only, "date": new_meta["date"], "drover_rev": new_meta["drover_rev"]})
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
        outdir = H.BENCH / "results" / stamp
        outdir.mkdir(parents=True, exist_ok=True)
        latest = H.BENCH / "results" / "latest"
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(stamp)
        ctx = Ctx(args, outdir)
        machine_meta(ctx)
        if args.only:
            ctx.results["meta"]["only"] = args.only
    H.QUIET["budget"] = 15.0 if args.quick else 60.0
    only = set(args.only.split(",")) if args.only else None
    t_all = now()
    say(f"results in {outdir}")
    try:
        run_all(ctx, args, only, t_all)
    finally:
        H.remove_tmps()


def run_all(ctx, args, only, t_all):
    outdir = ctx.outdir
    check_wsgi_worker(ctx)
    ctx.save()
    for name, fn in SCENARIOS:
        if only and name not in only:
            continue
        load_before = open("/proc/loadavg").read().split()[:3]
        H.QUIET["samples"] = []
        say(f"== {name} (load average {' '.join(load_before)})")
        t = now()
        try:
            res = fn(ctx)
        except Exception:  # noqa: BLE001 - a broken scenario must not stop the others
            res = {"crashed": traceback.format_exc()}
            say(f"{name} crashed:\n{res['crashed']}")
        res["elapsed_s"] = round(now() - t, 1)
        res["loadavg_before"] = load_before
        res["others_cpu"] = stats(H.QUIET["samples"])
        ctx.results["scenarios"][name] = res
        ctx.save()
    if not args.merge:
        ctx.results["meta"]["elapsed_s"] = round(now() - t_all, 1)
        ctx.results["meta"]["quiet_waited_s"] = round(H.QUIET["waited_s"], 1)
        ctx.results["meta"]["quiet_budget_s"] = H.QUIET["budget"]
    ctx.save()
    to_docs = (not args.quick and (not args.only or args.merge) and not ctx.results["meta"].get("only")) or args.docs
    path = report.write(ctx.results, outdir, to_docs=to_docs)
    say(f"done in {now() - t_all:.0f} s; report: {path}")


if __name__ == "__main__":
    main()
