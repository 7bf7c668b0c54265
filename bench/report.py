"""Turns a results.json of the harness into docs/benchmarks.md and SVG charts.

The charts are plain SVG written here (polylines and text), so the harness
needs nothing beyond the standard library.
"""

import math
import os
from html import escape
from pathlib import Path

import peers

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
CHARTS = ROOT / "bench" / "charts"

LABELS = {
    "drover-hello": "drover + hello",
    "drover-wsgi": "drover + drover_wsgi",
    "gunicorn": "Gunicorn (sync)",
    "circus-hello": "Circus + hello",
    "circus-wsgi": "Circus + drover_wsgi",
    "alone-hello": "hello alone",
}
# The Circus subject with the same worker as a drover subject.
CIRCUS_PEER = {"drover-hello": "circus-hello", "drover-wsgi": "circus-wsgi"}
COLORS = {
    "drover-hello": "#1f77b4",
    "drover-wsgi": "#17becf",
    "gunicorn": "#d62728",
    "circus-hello": "#2ca02c",
    "circus-wsgi": "#98df8a",
    "alone-hello": "#7f7f7f",
}


def label(key):
    return LABELS.get(key, key)


def num(v, digits=None):
    if v is None:
        return "—"
    if digits is None:
        a = abs(v)
        digits = 2 if a < 10 else 1 if a < 100 else 0
    return f"{v:,.{digits}f}"


def rng(st, digits=None, unit=""):
    """median (min–max) of a stats dict."""
    if not st or st.get("median") is None:
        miss = st.get("missing") if st else None
        return "—" + (f" ({miss} failed)" if miss else "")
    s = num(st["median"], digits) + unit
    if st["n"] > 1:
        s += f" ({num(st['min'], digits)}–{num(st['max'], digits)})"
    if st.get("missing"):
        s += f", {st['missing']} failed"
    return s


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "—"
    r = a / b
    return f"{r:.2f}×" if r >= 0.1 else f"{r:.3f}×"


def med(st):
    return st.get("median") if st else None


def code(text):
    """Text inside a Markdown code span in a table cell."""
    return "`" + str(text).replace("`", "'").replace("|", "\\|") + "`"


def unavailable_line(key, why):
    return f"| {label(key)} | not available ({escape(str(why))}) |"


# --------------------------------------------------------------------------
# SVG


def svg_chart(path, title, series, xlabel, ylabel, xlog=False, ylog=False, vlines=(), notes=(),
              xticks=None, width=960, height=440):
    """series: [(name, color, [(x, y)], dashed)]; vlines: [(x, text)]."""
    ml, mr, mt, mb = 70, 300, 40, 50
    pw, ph = width - ml - mr, height - mt - mb
    pts = [(x, y) for _, _, p, _ in series for x, y in p if y is not None]
    if not pts:
        pts = [(0, 1), (1, 10)]
    xs = [x for x, _ in pts] + [x for x, _ in vlines]
    ys = [y for _, y in pts]
    fx = (lambda v: math.log10(v)) if xlog else (lambda v: v)
    fy = (lambda v: math.log10(max(v, 1e-3))) if ylog else (lambda v: v)
    x0, x1 = fx(min(xs)), fx(max(xs))
    if ylog:
        y0, y1 = math.floor(fy(min(ys))), math.ceil(fy(max(ys)))
    else:
        y0, y1 = 0.0, max(ys) * 1.1
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1

    def px(v):
        return ml + (fx(v) - x0) / (x1 - x0) * pw

    def py(v):
        return mt + ph - (fy(v) - y0) / (y1 - y0) * ph

    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
         f'<rect width="{width}" height="{height}" fill="white"/>',
         f'<text x="{ml}" y="22" font-size="15" font-weight="bold">{escape(title)}</text>',
         f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>']
    # y grid
    if ylog:
        for e in range(int(y0), int(y1) + 1):
            v = 10 ** e
            y = py(v)
            o.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{ml + pw}" y2="{y:.1f}" stroke="#ddd"/>')
            o.append(f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end">{num(v, 0 if v >= 1 else 3)}</text>')
    else:
        step = nice_step(y1 / 5)
        v = 0.0
        while v <= y1:
            y = py(v)
            o.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{ml + pw}" y2="{y:.1f}" stroke="#ddd"/>')
            o.append(f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end">{num(v)}</text>')
            v += step
    # x ticks
    ticks = xticks
    if ticks is None:
        step = nice_step((max(xs) - min(xs)) / 8 or 1)
        ticks, v = [], math.floor(min(xs) / step) * step
        while v <= max(xs) + 1e-9:
            if v >= min(xs) - 1e-9:
                ticks.append(v)
            v += step
    for v in ticks:
        x = px(v)
        o.append(f'<line x1="{x:.1f}" y1="{mt + ph}" x2="{x:.1f}" y2="{mt + ph + 5}" stroke="#888"/>')
        o.append(f'<text x="{x:.1f}" y="{mt + ph + 18}" text-anchor="middle">{num(v, 0 if v == int(v) else 1)}</text>')
    o.append(f'<text x="{ml + pw / 2}" y="{height - 10}" text-anchor="middle">{escape(xlabel)}</text>')
    o.append(f'<text transform="translate(16,{mt + ph / 2}) rotate(-90)" text-anchor="middle">{escape(ylabel)}</text>')
    for x, text in vlines:
        xx = px(x)
        o.append(f'<line x1="{xx:.1f}" y1="{mt}" x2="{xx:.1f}" y2="{mt + ph}" stroke="#999" stroke-dasharray="3,3"/>')
        if text:
            o.append(f'<text x="{xx + 3:.1f}" y="{mt + 12}" fill="#666" font-size="10">{escape(text)}</text>')
    ly = mt + 10
    for name, color, p, dashed in series:
        p = [(x, y) for x, y in p if y is not None]
        dash = ' stroke-dasharray="6,4"' if dashed else ""
        if len(p) > 1:
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in p)
            o.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.8"{dash}/>')
        for x, y in p if len(p) <= 12 else []:
            o.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>')
        o.append(f'<line x1="{ml + pw + 12}" y1="{ly}" x2="{ml + pw + 34}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>')
        o.append(f'<text x="{ml + pw + 40}" y="{ly + 4}">{escape(name)}</text>')
        ly += 18
    for text in notes:
        ly += 6
        for chunk in wrap(text, 46):
            o.append(f'<text x="{ml + pw + 12}" y="{ly + 4}" fill="#a33" font-size="11">{escape(chunk)}</text>')
            ly += 14
    o.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(o) + "\n")


def wrap(text, width):
    out, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        out.append(line)
    return out


def nice_step(raw):
    if raw <= 0:
        return 1
    e = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * e:
            return m * e
    return 10 * e


# --------------------------------------------------------------------------
# Report


def write(res, outdir, to_docs):
    """Writes the report (and charts) into outdir; also to docs/ and
    bench/charts/ when to_docs. Returns the path of the main report."""
    outdir = Path(outdir)
    charts_dir = CHARTS if to_docs else outdir / "charts"
    md_path = DOCS if to_docs else outdir / "benchmarks.md"
    rel = os.path.relpath(charts_dir, md_path.parent)
    chart_files = charts(res, charts_dir)
    text = render(res, {k: f"{rel}/{v}" for k, v in chart_files.items()}, outdir)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    if to_docs:
        (outdir / "benchmarks.md").write_text(text.replace(f"]({rel}/", "](charts/"))
        oc = outdir / "charts"
        oc.mkdir(exist_ok=True)
        for f in chart_files.values():
            (oc / f).write_text((charts_dir / f).read_text())
    return md_path


def charts(res, d):
    out = {}
    sc = res.get("scenarios", {})
    st = sc.get("startup", {})
    if st.get("rows"):
        series = []
        plan = [("drover-hello", "log_ms", False, " (drover's line)"),
                ("drover-wsgi", "log_ms", False, " (drover's line)"),
                ("drover-wsgi", "pids_ms", True, " (distinct pids)"),
                ("gunicorn", "pids_ms", False, " (distinct pids)"),
                ("circus-hello", "lines_ms", False, " (worker lines)"),
                ("circus-wsgi", "lines_ms", False, " (worker lines)")]
        for key, metric, dashed, suffix in plan:
            p = [(r["n"], med(r.get(metric))) for r in st["rows"]
                 if r.get("subject") == key and med(r.get(metric))]
            if p:
                series.append((label(key) + suffix, COLORS[key], sorted(p), dashed))
        ns = sorted({r["n"] for r in st["rows"] if "n" in r})
        svg_chart(d / "startup.svg", "Start-up: all N workers serving (median)", series,
                  "workers (N, log scale)", "ms from exec of the master (log scale)", xlog=True, ylog=True,
                  xticks=ns)
        out["startup"] = "startup.svg"
    rl = sc.get("reload", {})
    if rl.get("rows"):
        series, vlines, notes = [], [], []
        by = {r["subject"]: r for r in rl["rows"]}
        for key in ("gunicorn", "drover-wsgi", "drover-hello"):
            r = by.get(key)
            if not r or r.get("unavailable"):
                continue
            if r.get("reload"):
                run = r["reload"][-1]
                series.append((f"{label(key)}, 5 reloads", COLORS[key], bucket_points(run), False))
                if not vlines:
                    vlines = [(m, "HUP") for m in run.get("marks_s", [])]
            elif r.get("reload_unavailable"):
                notes.append(f"{label(key)}: reload not implemented (SIGHUP ignored): no reload series")
            if r.get("baseline"):
                series.append((f"{label(key)}, no reload", COLORS[key], bucket_points(r["baseline"][-1]), True))
        if series:
            svg_chart(d / "reload.svg", "Latency during reloads under load (p99 per 100 ms, 50 connections)",
                      series, "seconds into the run", "p99 latency, ms (log scale)", ylog=True,
                      vlines=vlines, notes=notes)
            out["reload"] = "reload.svg"
    return out


def bucket_points(run):
    b = run.get("bucket_ms", 100)
    pts = []
    for t_ms, n_ok, n_err, p50, p99, mx in run.get("series", []):
        if n_ok:
            pts.append(((t_ms + b / 2) / 1000.0, p99 / 1000.0))
    return pts


def render(res, charts_rel, outdir):
    m = res.get("meta", {})
    sc = res.get("scenarios", {})
    cmds = res.get("commands", {})
    L = []
    w = L.append
    w("# Benchmarks")
    w("")
    w(f"Generated by `bench/run` ({m.get('mode', '?')} run, {m.get('reps', '?')} repetitions, "
      f"{m.get('date', '?')}, {num(m.get('elapsed_s'), 0)} s). Do not edit by hand: run `bench/run` "
      "again. Raw results (JSON) and every process's output are in "
      f"`bench/results/{Path(outdir).name}/` (not committed). How the harness works: "
      "[bench/README.md](../bench/README.md).")
    w("")
    w("Numbers are medians with min–max over the repetitions. A ratio is drover's value divided by "
      "the peer's: for times, below 1× means drover is faster; for throughput, above 1× means drover "
      "serves more. Loopback only, and the load generator shares the machine's cores with the "
      "system under test.")
    w("")
    if m.get("only"):
        w(f"**Partial run**: only `{m['only']}`.")
        w("")
    for mg in m.get("merged", []):
        w(f"Scenarios `{mg['scenarios']}` were run again on {mg['date']} (drover {mg['drover_rev']}) and "
          "replace those of the run above (`bench/run --merge`).")
        w("")
    targets(res, L)
    w("## Machine and versions")
    w("")
    w("| | |")
    w("|---|---|")
    for k, name in (("cpu", "CPU"), ("cores", "cores"), ("memory", "memory"), ("kernel", "kernel"), ("os", "OS"),
                    ("drover_rev", "drover (git)"), ("rustc", "rustc"), ("gunicorn", "Gunicorn"),
                    ("circus", "Circus"), ("wrk", "wrk"), ("python", "Python (all Python subjects)"),
                    ("strace", "strace")):
        w(f"| {name} | {escape(str(m.get(k)))} |")
    ww = m.get("wsgi_worker", {})
    w(f"| Python WSGI worker | {'available, drover waits for ' + ('READY=1' if ww.get('drover_ready_mode') == 'notify' else 'the spawn') if ww.get('available') else 'not available: ' + escape(str(ww.get('reason')))} |")
    w("")
    rows = [(k, v) for k, v in sc.items() if isinstance(v, dict)]
    if any(v.get("others_cpu") or v.get("loadavg_before") for _, v in rows):
        w("How busy the machine was (it is shared: other work runs on the same 2 cores). *CPU in use "
          "before a run* is sampled just before each run starts, when none of the harness's processes "
          f"run; the harness waits for it to drop below 25 % (up to 8 s before a run and "
          f"{num(m.get('quiet_budget_s', 60), 0)} s in a whole run; this run waited "
          f"{num(m.get('quiet_waited_s'), 0)} s).")
        w("")
        w("| scenario | load average before (1, 5, 15 min) | CPU in use before a run: median (max) | time, s |")
        w("|---|---|---|---:|")
        for k, v in rows:
            oc = v.get("others_cpu") or {}
            busy = f"{oc['median'] * 100:.0f} % ({oc['max'] * 100:.0f} %)" if oc.get("n") else "—"
            w(f"| {k} | {' '.join(v.get('loadavg_before', []))} | {busy} | {num(v.get('elapsed_s'), 0)} |")
        w("")
    w("## Subjects")
    w("")
    w("| subject | what runs |")
    w("|---|---|")
    w("| drover + hello | `drover -w N --set ready=notify -- target/release/hello` (the Rust reference worker) |")
    w("| drover + drover_wsgi | drover running `python workers/python/drover_wsgi.py bench_app:app` |")
    w("| Gunicorn (sync) | `gunicorn --worker-class sync -w N bench_app:app` |")
    w("| Circus + hello / drover_wsgi | `circusd` with a `[socket:web]` and `use_sockets = True`; "
      "`bench/adapters/fd_to_listen_fds.sh $(circus.sockets.web) …` moves the socket to fd 3 and sets "
      "`LISTEN_FDS`/`LISTEN_PID` before exec'ing the same worker as drover runs |")
    w("| hello alone | `bench/adapters/socket_exec.py` binds, puts the socket at fd 3 with `LISTEN_FDS=1`, "
      "`LISTEN_PID` and execs hello: no supervisor at all |")
    w("")
    w("`bench/apps/bench_app.py` is the WSGI app of every Python subject (the routes of hello: `/`, "
      "`/sleep?ms=N`, an `X-Worker-Pid` header; an `atexit` handler records that cleanup ran). All "
      "Python subjects run on the same interpreter (`bench/.venv`).")
    w("")
    sec_startup(sc.get("startup"), charts_rel, cmds, L)
    sec_stop(sc.get("stop_term"), "Graceful stop: SIGTERM with a request in flight", "term", cmds, L)
    sec_stop(sc.get("stop_int"), "Ctrl+C: SIGINT to the process group with a request in flight", "int", cmds, L)
    sec_kill_worker(sc.get("kill_worker"), cmds, L)
    sec_footprint(sc.get("footprint"), cmds, L)
    sec_throughput(sc.get("throughput"), cmds, L)
    sec_reload(sc.get("reload"), charts_rel, cmds, L)
    sec_kill_master(sc.get("kill_master"), cmds, L)
    sec_diagnose(sc.get("diagnose"), sc.get("footprint"), cmds, L)
    sec_observe(sc.get("observe"), cmds, L)
    sec_preload(sc.get("preload"), cmds, L)
    if sc.get("peers"):
        peers.render(sc["peers"], L)
        commands(cmds, "peers", L)
    return "\n".join(L) + "\n"


def commands(cmds, name, L, extra=()):
    c = cmds.get(name, {})
    if not c and not extra:
        return
    L.append("<details><summary>Exact commands</summary>")
    L.append("")
    L.append("```")
    for k, v in c.items():
        L.append(f"# {k}")
        L.append(v)
    for e in extra:
        L.append(e)
    L.append("```")
    L.append("")
    L.append("</details>")
    L.append("")


def crashed(s, L):
    if s is None:
        L.append("Not run.")
        L.append("")
        return True
    if s.get("crashed"):
        L.append("The scenario crashed:")
        L.append("")
        L.append("```")
        L.append(s["crashed"].strip()[-1500:])
        L.append("```")
        L.append("")
        return True
    if s.get("unavailable"):
        L.append(f"Not available ({s['unavailable']}).")
        L.append("")
        return True
    return False


def rows_by(s, *keys):
    out = {}
    for r in s.get("rows", []):
        out[tuple(r.get(k) for k in keys)] = r
    return out


# --------------------------------------------------------------------------
# Sections


def sec_startup(s, charts_rel, cmds, L):
    w = L.append
    w("## Start-up, and idle SIGTERM to exit")
    w("")
    w("From the exec of the master until all N workers serve; then, after 0.3 s idle, SIGTERM to the "
      "master until it exits (*stop*). Three ways to tell that N workers serve:")
    w("")
    w("- *drover's line*: drover logs `all N workers ready` (every worker sent `READY=1`, which both "
      "workers send once they accept), then one `GET /` answered 200. This is the measure of the targets.")
    w("- *worker lines*: N distinct workers printed their own `ready` line (`hello[PID]: ready`, "
      "`drover_wsgi[PID]: ready`), printed after they accept; the same for drover and Circus, which "
      "pass the workers' stderr through.")
    w("- *distinct pids*: a client keeps 2N connections (at most 256) busy with `GET /sleep?ms=5` "
      "until N distinct `X-Worker-Pid` have answered. The only way to see Gunicorn's workers serve; "
      "used for the Python subjects only (a threaded hello worker takes any number of connections, so "
      "for it the probe mostly measures how the kernel spreads connections).")
    w("")
    w("Ratios use the same measure on both sides: vs Gunicorn, distinct pids for drover + drover_wsgi; "
      "for drover + hello (Gunicorn cannot run hello) drover's line against Gunicorn's distinct pids (†). "
      "vs Circus, worker lines with the same worker.")
    w("")
    if crashed(s, L):
        return
    by = {(r["subject"], r["n"]): r for r in s["rows"] if not r.get("unavailable")}
    un = [r for r in s["rows"] if r.get("unavailable")]
    w("| subject | N | drover's line, ms | worker lines, ms | distinct pids, ms | vs Gunicorn | vs Circus | stop, ms | vs Gunicorn | vs Circus |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (key, n), r in sorted(by.items(), key=lambda kv: (list(LABELS).index(kv[0][0]), kv[0][1])):
        g = by.get(("gunicorn", n))
        c = by.get((CIRCUS_PEER.get(key), n))
        vs_g = vs_c = stop_g = stop_c = ""
        if key == "drover-hello" and g:
            vs_g = ratio(med(r.get("log_ms")), med(g.get("pids_ms"))) + " †"
        elif key == "drover-wsgi" and g:
            vs_g = ratio(med(r.get("pids_ms")), med(g.get("pids_ms")))
        if key.startswith("drover") and c:
            vs_c = ratio(med(r.get("lines_ms")), med(c.get("lines_ms")))
        if key.startswith("drover"):
            stop_g = ratio(med(r["stop_ms"]), med(g["stop_ms"])) if g else ""
            stop_c = ratio(med(r["stop_ms"]), med(c["stop_ms"])) if c else ""
        cell = lambda k: rng(r[k]) if k in r else ""  # noqa: E731
        errs = len(r.get("errors", []))
        w(f"| {label(key)} | {n} | {cell('log_ms')} | {cell('lines_ms')} | {cell('pids_ms')} | {vs_g} | {vs_c} | "
          f"{rng(r['stop_ms'])} | {stop_g} | {stop_c} |" + (f" {errs} run(s) failed" if errs else ""))
    for r in un:
        w(f"| {label(r['subject'])} | | not available ({escape(r['unavailable'])}) | | | | | | | |")
    w("")
    errs = [(r["subject"], r.get("n"), e) for r in s["rows"] for e in r.get("errors", [])]
    for key, n, e in errs[:8]:
        w(f"- {label(key)} N={n}: {escape(e)}")
    if errs:
        w("")
    survivors = sum(x.get("survivors", 0) for r in s["rows"] for x in r.get("samples", []))
    statuses = sorted({(r["subject"], x.get("exit_status")) for r in s["rows"] for x in r.get("samples", [])
                       if x.get("exit_status") not in (0, None)}, key=str)
    selfr = [(r["n"], med(r.get("self_ms"))) for (k, _), r in sorted(by.items()) if k == "drover-hello" and r.get("self_ms")]
    if selfr:
        w("drover's own figure in its `all N workers ready … after start` line (drover + hello): "
          + ", ".join(f"N={n}: {num(v)} ms" for n, v in selfr) + ".")
        w("")
    w(f"Workers left alive after the master exited: {survivors}. "
      + ("Non-zero exit statuses: " + ", ".join(f"{label(k)} {v}" for k, v in statuses) + "." if statuses
         else "Every master exited with status 0."))
    w("")
    if "startup" in charts_rel:
        w(f"![start-up time against worker count]({charts_rel['startup']})")
        w("")
    commands(cmds, "startup", L)


def _stats(values):
    v = sorted(x for x in values if x is not None)
    if not v:
        return {"n": 0, "median": None, "min": None, "max": None, "missing": len(values)}
    mid = len(v) // 2
    m = v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2
    return {"n": len(v), "median": m, "min": v[0], "max": v[-1], "missing": len(values) - len(v)}


def sec_stop(s, title, how, cmds, L):
    w = L.append
    w(f"## {title}")
    w("")
    if how == "term":
        w("2 workers; a `GET /sleep?ms=1000` is accepted by a worker, then SIGTERM goes to the master. "
          "Right after the signal a new connection tries `GET /`. *exit*: signal to master exit; "
          "*slow request*: its outcome and when it completed (after the signal); *cleanup*: workers whose "
          "cleanup ran (hello's registry, bench_app's `atexit`) / workers.")
    else:
        w("As above, but SIGINT goes to the whole process group of the master, as a terminal does on "
          "Ctrl+C (the subject runs as the foreground job).")
    w("")
    if crashed(s, L):
        return
    w("| subject | exit, ms | vs Gunicorn | vs Circus | slow request | completed at, ms | new connection | cleanup ran | exit status |")
    w("|---|---:|---:|---:|---|---:|---|---|---|")
    by = rows_by(s, "subject")
    for r in s["rows"]:
        key = r["subject"]
        if r.get("unavailable"):
            w(f"| {label(key)} | not available ({escape(r['unavailable'])}) | | | | | | | |")
            continue
        g, c = by.get(("gunicorn",)), by.get((CIRCUS_PEER.get(key),))
        dr = key.startswith("drover")
        n = len([x for x in r["samples"] if "error" not in x])
        new = ", ".join(r["new_outcomes"]) + (f" after {rng(r['new_ms'])} ms" if r["new_ms"].get("median") is not None else "")
        w(f"| {label(key)} | {rng(r['exit_ms'])} | {ratio(med(r['exit_ms']), med(g['exit_ms'])) if dr and g and not g.get('unavailable') else ''} | "
          f"{ratio(med(r['exit_ms']), med(c['exit_ms'])) if dr and c and not c.get('unavailable') else ''} | "
          f"{r['slow_ok']}/{n} ok" + (f" ({', '.join(o for o in r['slow_outcomes'] if o != 'ok')})" if any(o != 'ok' for o in r['slow_outcomes']) else "")
          + f" | {rng(r['slow_done_ms'])} | {new} | {', '.join(r['cleanups'])} | {', '.join(map(str, r['exit_statuses']))} |")
    w("")
    for r in s["rows"]:
        for e in r.get("errors", [])[:2]:
            w(f"- {label(r['subject'])}: {escape(e)}")
    commands(cmds, f"stop_{how}", L)


def sec_kill_worker(s, cmds, L):
    w = L.append
    w("## kill -9 of a worker until a replacement serves")
    w("")
    w("One worker; once it has run for 1.1 s (past drover's `respawn_reset_after`, set to 1 s here, so "
      "that it counts as a stable worker and is replaced at once; with the default 10 s a worker killed "
      "younger than that waits `respawn_delay`, 100 ms), SIGKILL goes to it and a client sends `GET /` "
      "at once, again until a 200 comes from a new pid. The connection waits in the listen backlog "
      "meanwhile, so the time is kill → replacement answered. Circus runs with its default "
      "`check_delay`.")
    w("")
    if crashed(s, L):
        return
    w("| subject | replaced and serving, ms | vs Gunicorn | vs Circus | failed requests |")
    w("|---|---:|---:|---:|---:|")
    by = rows_by(s, "subject")
    for r in s["rows"]:
        key = r["subject"]
        if r.get("unavailable"):
            w(f"| {label(key)} | not available ({escape(r['unavailable'])}) | | | |")
            continue
        g, c = by.get(("gunicorn",)), by.get((CIRCUS_PEER.get(key),))
        dr = key.startswith("drover")
        w(f"| {label(key)} | {rng(r['replaced_ms'])} | "
          f"{ratio(med(r['replaced_ms']), med(g['replaced_ms'])) if dr and g and not g.get('unavailable') else ''} | "
          f"{ratio(med(r['replaced_ms']), med(c['replaced_ms'])) if dr and c and not c.get('unavailable') else ''} | "
          f"{r['failed_requests']} |")
    w("")
    for r in s["rows"]:
        for e in r.get("errors", [])[:2]:
            w(f"- {label(r['subject'])}: {escape(e)}")
    commands(cmds, "kill_worker", L)


def sec_footprint(s, cmds, L):
    w = L.append
    w("## Master footprint while idle")
    w("")
    w("2 workers, idle for 1 s, then: resident memory of the master (`VmRSS` from /proc, split into "
      "anonymous and file-backed), wake-ups = voluntary + involuntary context switches of all its "
      "threads over the window, and system calls per second from `strace -c -f -p` over a second "
      "window of the same length (attaching and detaching interrupt the wait it is blocked in, which "
      "shows as one or two calls).")
    w("")
    if crashed(s, L):
        return
    w("| subject | RSS, kB | anon / file, kB | threads | wake-ups/s | vs Gunicorn | vs Circus | syscalls/s | most frequent syscalls |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    by = rows_by(s, "subject")
    for r in s["rows"]:
        key = r["subject"]
        if r.get("unavailable") or r.get("error"):
            w(f"| {label(key)} | not available ({escape(r.get('unavailable') or r.get('error'))}) | | | | | | | |")
            continue
        g, c = by.get(("gunicorn",)), by.get((CIRCUS_PEER.get(key),))
        dr = key.startswith("drover")
        ok = lambda p: p and not p.get("unavailable") and not p.get("error")  # noqa: E731
        top = ", ".join(f"{k} {v}" for k, v in r.get("syscall_top", [])) or "none"
        w(f"| {label(key)} | {r['rss_kb']:,} | {r['rss_anon_kb']:,} / {r['rss_file_kb']:,} | {r['threads']} | "
          f"{num(r['wakeups_per_s'])} | "
          f"{('RSS ' + ratio(r['rss_kb'], g['rss_kb'])) if dr and ok(g) else ''} | "
          f"{('RSS ' + ratio(r['rss_kb'], c['rss_kb'])) if dr and ok(c) else ''} | "
          f"{num(r.get('syscalls_per_s'))} | {top} |")
    w("")
    w(f"Window: {s['rows'][0].get('window_s', '?')} s each.")
    w("")
    commands(cmds, "footprint", L)


def sec_observe(s, cmds, L):
    w = L.append
    w("## The admin endpoint's cost")
    w("")
    w("drover + hello with `admin_bind` set and 128 workers: wake-ups (context switches) of the idle "
      "master while nobody scrapes, over the window; then the master's CPU time (schedstat) over a "
      "series of `GET /metrics`, per scrape (the targets: zero wake-ups, at most 1 ms per scrape).")
    w("")
    if crashed(s, L):
        return
    w("| workers | idle wake-ups | window, s | scrapes | master CPU per scrape, ms | wall per scrape, ms |")
    w("|---:|---:|---:|---:|---:|---:|")
    for r in s["rows"]:
        if r.get("error"):
            w(f"| {r['workers']} | not available ({escape(r['error'])}) | | | | |")
            continue
        w(f"| {r['workers']} | {r['idle_wakeups']} | {r['window_s']} | {r['scrapes']} | "
          f"{r['scrape_cpu_ms']} | {r['scrape_wall_ms']} |")
    w("")
    commands(cmds, "observe", L)


def sec_throughput(s, cmds, L):
    w = L.append
    w("## Throughput (hello world)")
    w("")
    if crashed(s, L):
        return
    w(f"`wrk -t2 -c50 -d{s.get('seconds')}s --latency` on `/`, after the subject is serving; subjects "
      "interleaved within each repetition. The WSGI app is "
      f"`{s.get('wsgi_app')}`" + (f" ({escape(s['wsgi_app_note'])})" if s.get("wsgi_app_note") else "")
      + ". hello keeps connections alive; Gunicorn's sync worker closes each one, so Python rows also "
      "pay a connect per request. Ratios: drover rows against hello alone, Gunicorn and Circus "
      "with the same worker count.")
    w("")
    w("| subject | workers | requests/s | vs hello alone | vs Gunicorn | vs Circus | p99, ms | max, ms | errors |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    by = rows_by(s, "subject", "n")
    alone = by.get(("alone-hello", 1))
    for r in s["rows"]:
        key, n = r["subject"], r["n"]
        if r.get("unavailable"):
            w(f"| {label(key)} | {n} | not available ({escape(r['unavailable'])}) | | | | | | |")
            continue
        dr = key.startswith("drover")
        g, c = by.get(("gunicorn", n)), by.get((CIRCUS_PEER.get(key), n))
        rv = med(r["rps"])
        ov = s.get("overhead") if key == "drover-hello" and n == 1 else None
        vs_alone = (rng(ov, 3) + "× ‡") if ov and ov.get("n") else \
            (ratio(rv, med(alone['rps'])) if key == 'drover-hello' and alone else '')
        w(f"| {label(key)} | {n} | {rng(r['rps'], 0)} | "
          f"{vs_alone} | "
          f"{ratio(rv, med(g['rps'])) if dr and g and not g.get('unavailable') else ''} | "
          f"{ratio(rv, med(c['rps'])) if dr and c and not c.get('unavailable') else ''} | "
          f"{rng(r['p99_ms'])} | {rng(r['max_ms'])} | {r['errors']} |")
    w("")
    if s.get("overhead_pairs"):
        w("‡ drover's overhead: hello alone and drover + one hello are run back to back in pairs, "
          "in alternating order; the ratio is the median (min–max) of the pairs' ratios: "
          + ", ".join(f"{x:.3f}" for x in s["overhead_pairs"]) + ". drover is not on the data path "
          "(the worker accepts on the shared socket itself, and the idle master makes no wake-ups: "
          "see the footprint section); the spread of the pairs shows how much this shared machine "
          "moves between two runs of the same thing.")
        w("")
    commands(cmds, "throughput", L)


def sec_reload(s, charts_rel, cmds, L):
    w = L.append
    w("## Reload under load (and upgrade)")
    w("")
    if crashed(s, L):
        return
    w(f"2 workers, `bench/loadgen` with {s.get('conns')} connections for {s.get('seconds')} s, each "
      "connection sending `GET /` with `Connection: close` in a loop (wrk reports totals only; this "
      "load generator keeps every request, which the chart needs). *baseline*: the same run without "
      "reloads; *reload*: SIGHUP to the master at " + ", ".join(f"{x:.1f}" for x in s.get("schedule_s", []))
      + " s (five reloads; for drover also a run with SIGUSR2, a binary upgrade, at the same times, "
      "each sent to the master that serves then). *applied*: how many the master's log shows as done "
      "(drover: `reload applied`, `upgrade: new master … ready`; Gunicorn: `Hang up: Master`; Circus: "
      "`web reloaded`; Circus refuses a reload while one runs: `ConflictError`); signals that arrive during a reload are merged into one by drover. "
      "*failed*: refused, reset, truncated, timed-out or non-200 requests. "
      "Target for drover: zero failed, p99 ≤ 1.2× its baseline.")
    w("")
    w("| subject | run | applied | failed | requests/s | p99, ms | max, ms | p99 vs baseline |")
    w("|---|---|---|---:|---:|---:|---:|---:|")
    for r in s["rows"]:
        key = r["subject"]
        if r.get("unavailable"):
            w(f"| {label(key)} | | not available ({escape(r['unavailable'])}) | | | | |")
            continue
        base = r.get("baseline_summary", {})
        for name in ("baseline", "reload", "upgrade"):
            if name == "upgrade" and not key.startswith("drover"):
                continue
            sm = r.get(f"{name}_summary", {})
            if name != "baseline" and r.get(f"{name}_unavailable"):
                w(f"| {label(key)} | {name} | not available ({escape(r[f'{name}_unavailable'])}) | | | | | |")
                continue
            if not sm or sm["rps"]["n"] == 0:
                w(f"| {label(key)} | {name} | | — {('(' + escape(r['error']) + ')') if r.get('error') else ''} | | | | |")
                continue
            bad = {k: v for k, v in sm["outcomes"].items() if k != "ok" and v}
            failed = rng(sm["failed"], 0) + (f" ({', '.join(f'{k} {v}' for k, v in bad.items())})" if bad else "")
            applied = "" if name == "baseline" else ", ".join(f"{a}/5" for a in sm.get("applied", []))
            w(f"| {label(key)} | {name} | {applied} | {failed} | {rng(sm['rps'], 0)} | {rng(sm['p99_ms'])} | {rng(sm['max_ms'])} | "
              f"{ratio(med(sm['p99_ms']), med(base.get('p99_ms'))) if name != 'baseline' else ''} |")
    w("")
    if "reload" in charts_rel:
        w(f"![latency over time during reloads]({charts_rel['reload']})")
        w("")
    commands(cmds, "reload", L)


def sec_kill_master(s, cmds, L):
    w = L.append
    w("## SIGKILL of the master: how long do workers survive?")
    w("")
    if crashed(s, L):
        return
    w(f"2 idle workers; SIGKILL to the master, then the time until every worker has exited (pidfd), "
      f"watched for at most {s.get('cap_s')} s (all subjects at once, each timed from its own kill). "
      "Then a `GET /` shows whether orphans still take traffic (only then: a request wakes a Gunicorn "
      "worker up, and it notices that its parent changed). drover's workers have `PR_SET_PDEATHSIG`=SIGKILL; Gunicorn's sync workers "
      "check their parent pid between accepts and after each `select` timeout (half the worker timeout, "
      "15 s by default); Circus does nothing.")
    w("")
    w("| subject | workers gone after, ms | still alive at the cap | GET / at the cap |")
    w("|---|---:|---:|---|")
    for r in s["rows"]:
        key = r["subject"]
        if r.get("unavailable"):
            w(f"| {label(key)} | not available ({escape(r['unavailable'])}) | | |")
            continue
        total = sum(x.get("workers", 0) for x in r["samples"])
        gone = rng(r["all_gone_ms"]) if r["all_gone_ms"].get("n") else f"> {num(s.get('cap_s'), 0)} s (the cap)"
        w(f"| {label(key)} | {gone} | {r['survivors']} of {total} | {', '.join(r['answered'])} |")
    w("")
    commands(cmds, "kill_master", L)


def sec_diagnose(s, fp, cmds, L):
    w = L.append
    w("## Where drover's time and memory go")
    w("")
    if crashed(s, L):
        return
    cpu = s.get("cpu", {})
    if cpu:
        runs = sorted({d.get("runs", 1) for d in cpu.values()})
        per_n = ", ".join(f"{d.get('runs', 1)} for N = {n}" for n, d in sorted(cpu.items(), key=lambda kv: int(kv[0])))
        w(f"Untraced start-ups and stops of drover + hello (each figure is the median over the runs: "
          f"{per_n}). *CPU at ready*: CPU time used so far by the "
          "master and by its workers (all threads, `/proc/PID/task/*/schedstat`) when drover logs `all N "
          "workers ready`. *spawn loop*: from the first to the last `worker k spawned` line (drover's own "
          "timestamps), per spawn. *stop CPU*: CPU time of the master and all its workers from that "
          "moment to the master's exit (its `wait4` rusage, which includes the workers it reaped, minus "
          "the CPU at ready). With 2 cores, CPU / 2 is a floor for the wall time, whatever drover does.")
        w("")
        w("| N | start, ms | master CPU at ready, ms (per worker) | workers' CPU at ready, ms (per worker) | start floor: CPU / cores, ms | spawn loop, ms (per spawn) | stop, ms | stop CPU, ms | stop floor, ms |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n, d in sorted(cpu.items(), key=lambda kv: int(kv[0])):
            cores = max(1, d.get("cores") or 1)
            floor = ((d.get("master_cpu_ms") or 0) + d.get("workers_cpu_ms", 0)) / cores
            sc_ = d.get("stop_cpu_ms")
            w(f"| {n} | {num(d.get('wall_ms'))} | {num(d.get('master_cpu_ms'))} ({num(d.get('master_per_worker_ms'), 3)}) | "
              f"{num(d.get('workers_cpu_ms'))} ({num(d.get('per_worker_ms'), 3)}) | {num(floor)} | "
              f"{num(d.get('spawn_loop_ms'))} ({num(d.get('spawn_each_ms'), 3)}) | {num(d.get('stop_ms'))} | "
              f"{num(sc_)} | {num(sc_ / cores) if sc_ is not None else '—'} |")
        w("")
        w("The master forks a worker and goes on to the next without waiting for its exec: each child's "
          "close-on-exec report pipe is read from the event loop (end of file: exec'd; 5 bytes: the step "
          "that failed), at most 64 children on their way to exec at once (fewer under a tight descriptor limit). *per spawn* against the "
          "master's CPU per worker shows how much of the spawn loop is the master's own work; the pipes "
          "are the `pipe2` and `read` per worker in the system call counts below.")
        w("")
    ex = s.get("exec_cpu_ms")
    if ex:
        w("CPU time of one run of a program that exits at once, as its parent's `wait4` rusage reports it "
          "(median of 40): " + "; ".join(f"`{k}` {num(v, 3)} ms" for k, v in ex.items())
          + ". That is the price of an exec on this machine, paid by every worker before drover's part starts.")
        w("")
    d4, d128 = s.get("n4") or {}, s.get("n128") or {}
    if d4.get("by_time_ms") and d128.get("by_time_ms"):
        c4 = {k: n for k, n, _ in d4.get("calls", d4["by_time_ms"])}
        c128 = {k: n for k, n, _ in d128.get("calls", d128["by_time_ms"])}
        w(f"System calls of the master alone (`strace -f` is not used: its workers are not counted) from its "
          f"exec to its `all N workers ready` line: {d4.get('syscalls')} with 4 workers, "
          f"{d128.get('syscalls')} with 128, so about {(d128.get('syscalls', 0) - d4.get('syscalls', 0)) / 124:.1f} "
          "per worker. By call (strace slows every call, so only the counts are shown):")
        w("")
        w("| system call | N = 4 | N = 128 | per extra worker |")
        w("|---|---:|---:|---:|")
        for k in sorted(set(c4) | set(c128), key=lambda k: -c128.get(k, 0))[:14]:
            w(f"| {k} | {c4.get(k, 0)} | {c128.get(k, 0)} | {(c128.get(k, 0) - c4.get(k, 0)) / 124:.2f} |")
        w("")
    if fp and fp.get("rows"):
        for r in fp["rows"]:
            if r.get("subject") == "drover-hello" and r.get("top_mappings_kb"):
                w(f"Resident memory of the idle drover master: {r['rss_kb']:,} kB, of which "
                  f"{r['rss_anon_kb']:,} kB anonymous (heap, stacks) and {r['rss_file_kb']:,} kB file-backed "
                  "(pages of the drover binary and shared libraries, shared with every other process that "
                  f"maps them; PSS {num(r.get('pss_kb'), 0)} kB). By mapping (kB, /proc/PID/smaps): "
                  + ", ".join(f"`{escape(str(k))}` {v}" for k, v in r["top_mappings_kb"]) + ".")
                w("")
    commands(cmds, "diagnose", L)


# --------------------------------------------------------------------------
# Targets


def targets(res, L):
    sc = res.get("scenarios", {})
    w = L.append
    rows = []

    def startup_row(n):
        for r in sc.get("startup", {}).get("rows", []):
            if r.get("subject") == "drover-hello" and r.get("n") == n:
                return r
        return None

    def add(what, target, value, unit, limit, lower_is_better=True, note=""):
        if value is None:
            rows.append((what, target, "not measured" + (f" ({note})" if note else ""), "—"))
            return
        ok = value <= limit if lower_is_better else value >= limit
        if ok:
            verdict = "met"
        elif lower_is_better:
            verdict = f"**missed** by {num(value - limit)} {unit} ({value / limit:.2f}× the target)" if limit else \
                f"**missed** ({num(value)} {unit})"
        else:
            verdict = f"**missed** by {(1 - value / limit) * 100:.1f} %"
        shown = f"{value:.3f}×" if unit == "×" else f"{num(value)} {unit}"
        rows.append((what, target, shown + (f" ({note})" if note else ""), verdict))

    r4 = startup_row(4)
    add("all 4 workers serving after start", "≤ 5 ms", med(r4.get("log_ms")) if r4 else None, "ms", 5,
        note="drover + hello, drover's line + a 200")
    add("idle SIGTERM to exit (4 workers)", "≤ 10 ms", med(r4["stop_ms"]) if r4 else None, "ms", 10)
    kw = next((r for r in sc.get("kill_worker", {}).get("rows", []) if r.get("subject") == "drover-hello"), None)
    add("killed worker replaced and serving", "≤ 3 ms", med(kw["replaced_ms"]) if kw and "replaced_ms" in kw else None, "ms", 3)
    fp = next((r for r in sc.get("footprint", {}).get("rows", []) if r.get("subject") == "drover-hello"), None)
    add("master resident memory, idle", "< 3 MB (3,072 kB)", fp.get("rss_kb") if fp else None, "kB", 3072)
    add("master wake-ups while idle", "0 /s", fp.get("wakeups_per_s") if fp else None, "/s", 0)
    r128 = startup_row(128)
    add("128 workers serving after start", "≤ 100 ms", med(r128.get("log_ms")) if r128 else None, "ms", 100,
        note="drover + hello, drover's line + a 200")
    add("128 workers stopped (SIGTERM to exit)", "≤ 50 ms", med(r128["stop_ms"]) if r128 else None, "ms", 50)
    rl = {r["subject"]: r for r in sc.get("reload", {}).get("rows", [])}
    for key in ("drover-hello", "drover-wsgi"):
        for op in ("reload", "upgrade"):
            what = f"{op}s under load ({label(key)})"
            goal = "0 failed, p99 ≤ 1.2× no-reload"
            r = rl.get(key)
            if not r or r.get("unavailable"):
                rows.append((what, goal, "not measured" + (f" ({escape(r['unavailable'])})" if r else ""), "—"))
            elif r.get(f"{op}_unavailable"):
                rows.append((what, goal, f"not available: {escape(r[f'{op}_unavailable'])}", "**missed** (not implemented)"))
            elif r.get(f"{op}_summary", {}).get("rps", {}).get("n"):
                sm, base = r[f"{op}_summary"], r["baseline_summary"]
                failed = med(sm["failed"])
                p = med(sm["p99_ms"]) / med(base["p99_ms"]) if med(base["p99_ms"]) else None
                shown = f"{num(failed, 0)} failed, p99 {p:.2f}× baseline" if p else "—"
                if failed == 0 and p is not None and p <= 1.2:
                    verdict = "met"
                else:
                    bits = ([f"{num(failed, 0)} failed requests"] if failed else []) + \
                        ([f"p99 {(p / 1.2 - 1) * 100:.0f} % over 1.2×"] if p and p > 1.2 else [])
                    verdict = "**missed**: " + ", ".join(bits)
                rows.append((what, goal, shown, verdict))
            else:
                rows.append((what, goal, "not measured", "—"))
    tp = {(r["subject"], r["n"]): r for r in sc.get("throughput", {}).get("rows", [])}
    a, d1 = tp.get(("alone-hello", 1)), tp.get(("drover-hello", 1))
    ov = sc.get("throughput", {}).get("overhead")
    if ov and ov.get("n"):
        add("drover + hello vs hello alone (1 worker)", "≥ 0.97×", ov["median"], "×", 0.97,
            lower_is_better=False, note=f"median of {ov['n']} back-to-back pairs, {ov['min']:.3f}–{ov['max']:.3f}")
    elif a and d1 and med(a.get("rps")) and med(d1.get("rps")):
        add("drover + hello vs hello alone (1 worker)", "≥ 0.97×", med(d1["rps"]) / med(a["rps"]), "×", 0.97,
            lower_is_better=False)
    else:
        rows.append(("drover + hello vs hello alone", "≥ 0.97×", "not measured", "—"))
    for n in (2, 4):
        g, dw = tp.get(("gunicorn", n)), tp.get(("drover-wsgi", n))
        if dw and dw.get("unavailable"):
            rows.append((f"drover_wsgi vs Gunicorn sync ({n} workers)", "≥ 1.0×",
                         f"not available ({escape(dw['unavailable'])})", "—"))
        elif g and dw and med(g.get("rps")) and med(dw.get("rps")):
            add(f"drover_wsgi vs Gunicorn sync ({n} workers)", "≥ 1.0×", med(dw["rps"]) / med(g["rps"]), "×", 1.0,
                lower_is_better=False)
        else:
            rows.append((f"drover_wsgi vs Gunicorn sync ({n} workers)", "≥ 1.0×", "not measured", "—"))
    w("## Targets")
    w("")
    w("| target | goal | measured (median) | verdict |")
    w("|---|---|---|---|")
    for r in rows:
        w("| " + " | ".join(str(x) for x in r) + " |")
    w("")
    limits(res, rows, L)


def limits(res, rows, L):
    """What limits each missed target, from the evidence the harness took
    (diagnose, footprint): numbers, not guesses."""
    sc = res.get("scenarios", {})
    missed = {r[0] for r in rows if "missed" in str(r[3])}
    if not missed:
        return
    w = L.append
    dg = sc.get("diagnose", {})
    cpu = dg.get("cpu", {})
    ex = dg.get("exec_cpu_ms", {})
    true_ms = ex.get("/bin/true")
    hello_ms = next((v for k, v in ex.items() if k.startswith("hello")), None)
    notes = []
    check_ms = next((v for k, v in ex.items() if k.startswith("drover check")), None)
    d4, d128 = cpu.get("4"), cpu.get("128")
    fixed = per = None
    if d4 and d128 and d4.get("master_cpu_ms") is not None and d128.get("master_cpu_ms") is not None:
        per = (d128["master_cpu_ms"] - d4["master_cpu_ms"]) / 124
        fixed = d4["master_cpu_ms"] - 4 * per
    for n, what in ((4, "all 4 workers serving after start"), (128, "128 workers serving after start")):
        d = cpu.get(str(n))
        if what not in missed or not d:
            continue
        cores = max(1, d.get("cores") or 1)
        floor = ((d.get("master_cpu_ms") or 0) + d.get("workers_cpu_ms", 0)) / cores
        target = 5 if n == 4 else 100
        text = (f"**{what}**: in the untraced diagnose runs (medians) drover started {n} workers in {num(d.get('wall_ms'))} ms "
                f"(its own figure). CPU: by then the workers had used {num(d.get('workers_cpu_ms'))} ms "
                f"({num(d.get('per_worker_ms'), 2)} ms each; on this machine an exec of `/bin/true` alone costs "
                f"{num(true_ms, 2)} ms, of hello exiting at once {num(hello_ms, 2)} ms) and the master "
                f"{num(d.get('master_cpu_ms'))} ms")
        if fixed is not None:
            text += (f" (between N = 4 and N = 128: about {num(fixed, 2)} ms fixed, of which "
                     f"{num(check_ms, 2)} ms are `drover check`'s exec, arguments and config, plus "
                     f"{num(per, 2)} ms per worker)")
        text += f"; on {cores} cores that is a floor of {num(floor)} ms"
        text += (", above the target whatever drover does." if floor > target else
                 f", under the target: the rest is waiting.")
        each, mper = d.get("spawn_each_ms"), d.get("master_per_worker_ms")
        if each and mper:
            text += (f" The spawn loop took {num(each, 2)} ms per worker from one `spawned` line to the "
                     f"next; the master's CPU per worker, {num(mper, 2)} ms, also counts what follows the "
                     "forks (each exec report and READY=1)")
            text += (": the rest of the spawn loop is the master waiting for a core the children's execs hold."
                     if each > mper else ".")
        notes.append(text)
    if "128 workers stopped (SIGTERM to exit)" in missed and cpu.get("128"):
        d = cpu["128"]
        notes.append(f"**128 workers stopped**: stopping 128 workers used {num(d.get('stop_cpu_ms'))} ms of CPU "
                     f"(master and workers, from the master's `wait4` rusage), a floor of "
                     f"{num((d.get('stop_cpu_ms') or 0) / max(1, d.get('cores') or 1))} ms on {d.get('cores')} cores; "
                     f"untraced it took {num(d.get('stop_ms'))} ms in the diagnose run.")
    if "killed worker replaced and serving" in missed:
        notes.append(f"**killed worker replaced**: a replacement is one spawn of hello, whose exec and start "
                     f"alone cost {num(hello_ms, 2)} ms of CPU on this machine (`/bin/true`: {num(true_ms, 2)} ms), "
                     "plus its `READY=1`, drover's reaping of the dead worker and the request itself.")
    fp = next((r for r in sc.get("footprint", {}).get("rows", []) if r.get("subject") == "drover-hello"), None)
    if "master resident memory, idle" in missed and fp and fp.get("rss_kb"):
        maps = dict(fp.get("top_mappings_kb", []))
        notes.append(f"**master resident memory**: {fp['rss_kb']:,} kB, of which only {fp['rss_anon_kb']:,} kB "
                     f"is the master's own (anonymous: heap, stack); {fp['rss_file_kb']:,} kB are file pages "
                     f"mapped from disk: the drover binary {maps.get('drover', '?')} kB"
                     + (f" (its code mapping is {fp['text_kb']:,} kB, of which {fp['text_rss_kb']:,} kB "
                        "resident)" if fp.get("text_kb") else "") + ", libc "
                     f"{maps.get('libc.so.6', '?')} kB, ld.so {maps.get('ld-linux-x86-64.so.2', '?')} kB. "
                     "These pages are shared with every other process mapping the same files (PSS "
                     f"{num(fp.get('pss_kb'), 0)} kB). Getting under 3 MB means mapping fewer pages of the binary: "
                     "less code (a build for size, fewer dependencies on the master's path).")
    for what in sorted(missed):
        if what.startswith("reloads") or what.startswith("upgrades"):
            notes.append(f"**{what}**: one 8 s run per case, no failed request; the p99 of 100 ms windows is "
                         "in the chart of the reload section (a new generation of Python workers boots while the "
                         "old one serves, on the same 2 cores as the load generator). The harness took no "
                         "profile of this case: measured here is only the latency, not its cause.")
    if notes:
        w("What limits the missed targets (evidence from the *Where drover's time and memory go* section):")
        w("")
        for n in notes:
            w(f"- {n}")
        w("")


def sec_preload(s, cmds, L):
    w = L.append
    w("## Preload: workers forked from a template")
    w("")
    w("drover + drover_wsgi without and with `preload = true` (the app imported once per generation by a "
      "template, the workers forked from it), against Gunicorn's sync workers without and with `--preload`, "
      "on two apps: `bench/apps/flask_app.py` (Flask) and a default Django project "
      "(`django-admin startproject`, `bench/apps/django_app.py` adds `X-Worker-Pid`). *Serving*: from the "
      "exec of the master until N distinct workers have answered the probe (the start-up scenario's "
      "distinct-pid measure, the same for all four). *PSS*: after those N answered and 200 more requests, "
      "the sum of `Pss` in `/proc/PID/smaps_rollup` of the master and all its descendants (template and "
      "workers included). *kill -9*: one worker, killed after 1.1 s, until a 200 from a new pid. "
      "Targets: 128 preloaded workers serving in ≤ 1 s; a replacement serving in ≤ 10 ms; PSS at most "
      "Gunicorn `--preload`'s for the same app and N.")
    w("")
    if crashed(s, L):
        return
    rows = s.get("rows", [])
    subjects = []
    for r in rows:
        if (r["subject"], r["label"]) not in subjects:
            subjects.append((r["subject"], r["label"]))
    ns = sorted({r["n"] for r in rows if r["n"] != "kill"})
    for app in sorted({r["app"] for r in rows}, key=lambda a: (a != "flask", a)):
        by = {(r["subject"], r["n"]): r for r in rows if r["app"] == app}
        w(f"### {app}")
        w("")
        w("| subject | " + " | ".join(f"N={n}: serving, ms | N={n}: PSS, MiB" for n in ns)
          + " | kill -9 → serving, ms |")
        w("|---|" + "---:|---:|" * len(ns) + "---:|")
        for key, lab in subjects:
            cells = []
            for n in ns:
                r = by.get((key, n))
                pss = r and r["pss_kb"]
                cells.append(rng(r["pids_ms"], 0) if r else "—")
                cells.append(rng({k: (v / 1024 if isinstance(v, (int, float)) and k in ("median", "min", "max")
                                      else v) for k, v in pss.items()}, 1) if pss else "—")
            k = by.get((key, "kill"))
            cells.append(rng(k["replaced_ms"], 1) if k else "—")
            w(f"| {lab} | " + " | ".join(cells) + " |")
        w("")
        for (key, n), r in by.items():
            for e in r.get("errors", [])[:1]:
                w(f"- {key} N={n}: {escape(e)}")
        w("")
    commands(cmds, "preload", L)
