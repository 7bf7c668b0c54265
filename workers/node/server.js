#!/usr/bin/env node
// A drover worker in Node.js (18 or newer), standard library only.
//
//   drover -w 2 -b 127.0.0.1:8000 --set ready=notify -- node workers/node/server.js
//
// It serves on the sockets drover passes (LISTEN_FDS, fd 3..), reports
// READY=1 through systemd-notify (Node has no Unix datagram socket), drains
// on SIGTERM and stops at once on SIGQUIT, runs its cleanup and exits 0.
// docs/other-languages.md explains each step.
//
// Routes (any method): /  -> "hello from pid N"; /sleep?ms=N -> sleeps N ms,
// then "slept N ms"; anything else 404. Every response has X-Worker-Pid.
// Cleanup: with EXAMPLE_CLEANUP_FILE set, appends "cleanup pid=N" to it.
// EXAMPLE_BOOT_MS=N: a slow start (loading, connecting to a database): N ms
// before it listens.
'use strict';

const fs = require('node:fs');
const http = require('node:http');
const net = require('node:net');
const { execFile } = require('node:child_process');

const PID = String(process.pid);
// How long a kept-alive connection may stay idle once the stop began: time
// for a client that is about to reuse it to send its request (answered with
// Connection: close) instead of finding it closed under it.
const IDLE_GRACE_MS = 1000;
const MAX_MS = 3600000;

function log(message) {
  process.stderr.write(`node worker[${PID}]: ${message}\n`);
}

// The sockets drover passed: fds 3 .. 3+LISTEN_FDS-1, if LISTEN_PID is ours.
function listenFds() {
  if (process.env.LISTEN_PID !== PID) return [];
  const count = Number(process.env.LISTEN_FDS || 0);
  // Programs this worker starts must not take the sockets too (libuv does
  // not pass fd 3 to a child, but a child's own children might see the
  // variables).
  delete process.env.LISTEN_FDS;
  delete process.env.LISTEN_PID;
  delete process.env.LISTEN_FDNAMES;
  return Array.from({ length: count }, (_, i) => 3 + i);
}

// One notify message to drover. Node's standard library has no Unix
// datagram socket, so systemd-notify (Debian's systemd package) sends it:
// drover accepts messages from a worker's child, and systemd-notify waits
// until drover has read its message (BARRIER=1), so it is still alive when
// drover looks up who sent it.
function notify(...assignments) {
  if (!process.env.NOTIFY_SOCKET) return; // not under drover (or systemd)
  execFile('systemd-notify', assignments, (err, stdout, stderr) => {
    if (err && err.code === 'ENOENT') {
      log('systemd-notify is not installed (Debian: apt-get install systemd): drover cannot hear ' +
        `${assignments.join(' ')}; use ready = "spawn" or install it`);
    } else if (err) {
      log(`systemd-notify ${assignments.join(' ')} failed: ${stderr.trim() || err.message}`);
    }
  });
}

// Seconds from the environment, as drover writes them ("30", "0.5").
function seconds(name, fallback) {
  const value = Number(process.env[name]);
  return Number.isFinite(value) && value > 0 ? value : fallback;
}

// The time to drain in-flight requests after a stop signal, in ms: 4/5 of
// the budget that is left once a reserve is kept back for the cleanup and the
// exit (the same rule as drover's SDKs, docs/workers.md#the-stop-budget).
function drainMs(timeout) {
  const reserve = Math.min(Math.max(0.25, timeout * 0.05), timeout / 2);
  return (timeout - reserve) * 0.8 * 1000;
}

function cleanup() {
  const path = process.env.EXAMPLE_CLEANUP_FILE;
  if (path) fs.appendFileSync(path, `cleanup pid=${PID}\n`);
  log('cleanup done');
}

function respond(res, status, text) {
  res.writeHead(status, {
    'Content-Type': 'text/plain',
    'Content-Length': Buffer.byteLength(text),
    'X-Worker-Pid': PID,
  });
  res.end(text);
}

function app(req, res) {
  const url = new URL(req.url, 'http://worker');
  if (url.pathname === '/') return respond(res, 200, `hello from pid ${PID}\n`);
  if (url.pathname === '/sleep') {
    const raw = url.searchParams.get('ms') || '';
    const ms = /^\d+$/.test(raw) ? Number(raw) : NaN;
    if (!(ms <= MAX_MS)) return respond(res, 400, `ms must be a number of milliseconds up to ${MAX_MS}\n`);
    return setTimeout(() => respond(res, 200, `slept ${ms} ms\n`), ms);
  }
  return respond(res, 404, 'not found\n');
}

function main() {
  const fds = listenFds();
  if (fds.length === 0) {
    log('no listening socket from drover (LISTEN_FDS, LISTEN_PID)');
    process.exit(3); // cannot boot: drover does not respawn it in a loop
  }

  let closing = false; // answer Connection: close from now on
  const inFlight = new Set(); // responses not yet finished
  function handle(req, res) {
    inFlight.add(res);
    res.on('close', () => inFlight.delete(res));
    if (closing) res.setHeader('Connection', 'close');
    app(req, res);
  }
  // One HTTP server per socket (a server listens on one).
  const servers = fds.map((fd) => http.createServer(handle).listen({ fd }));

  function endKeepAlive() {
    closing = true;
    for (const res of inFlight) if (!res.headersSent) res.setHeader('Connection', 'close');
  }

  let stopping = null;
  let exited = false;
  function exit() {
    if (exited) return;
    exited = true;
    try {
      cleanup();
    } catch (err) {
      log(`cleanup failed: ${err.stack || err}`);
    }
    process.exit(0);
  }
  function stop(kind) {
    if (stopping === 'quick' || stopping === kind) return; // quick wins
    const first = stopping === null;
    stopping = kind;
    if (first) {
      // Stop accepting: close this process's copy of each socket; the other
      // workers (and, outside a shutdown, drover) keep theirs and take what
      // is queued. net.Server's close, not http.Server's: since Node 19 that
      // also closes the idle kept-alive connections at once, under clients
      // that may be sending their next request. Its callback runs when the
      // server's last connection has closed.
      let drained = 0;
      for (const server of servers) {
        net.Server.prototype.close.call(server, () => {
          drained += 1;
          if (drained === servers.length) exit();
        });
      }
      endKeepAlive();
    }
    if (kind === 'quick') {
      for (const server of servers) server.closeAllConnections();
      return exit();
    }
    const started = Date.now();
    const deadline = started + drainMs(seconds('DROVER_GRACEFUL_TIMEOUT', 30));
    const graceEnd = Math.min(started + IDLE_GRACE_MS, deadline);
    setInterval(() => {
      const now = Date.now();
      if (now >= deadline) {
        log('drain deadline: closing the connections still open');
        for (const server of servers) server.closeAllConnections();
        exit();
      } else if (now >= graceEnd) {
        // Again and again: a response whose head went out before the stop
        // leaves its connection kept alive, and idle, when it ends.
        for (const server of servers) server.closeIdleConnections();
      }
    }, 20);
  }

  process.on('SIGTERM', () => stop('graceful'));
  process.on('SIGINT', () => stop('graceful'));
  process.on('SIGQUIT', () => stop('quick'));
  // drover forwards SIGUSR1 ("reopen your log files"). Without a listener,
  // Node starts its inspector on 127.0.0.1:9229 on SIGUSR1: a debugger that
  // any local user can attach to.
  process.on('SIGUSR1', () => {});
  // drover's pre-stop delay: keep serving, but end keep-alive.
  process.on('SIGWINCH', endKeepAlive);

  let listening = 0;
  for (const server of servers) {
    server.on('listening', () => {
      listening += 1;
      if (listening === servers.length) {
        notify('READY=1', 'STATUS=serving');
        heartbeats();
      }
    });
  }
}

// With `timeout` set, drover expects WATCHDOG=1 at least every WATCHDOG_USEC
// microseconds: sent at half that, from a timer of the event loop, so that a
// loop blocked by a handler that never yields (the way a Node worker wedges)
// sends none, and drover replaces the worker.
function heartbeats() {
  const usec = Number(process.env.WATCHDOG_USEC);
  if (process.env.WATCHDOG_PID !== PID || !(usec > 0)) return;
  setInterval(() => notify('WATCHDOG=1'), usec / 2000);
}

// Tell drover at once that READY=1 will come, so that with ready = "auto"
// (the default) drover waits for it, however long the start takes.
notify('X_DROVER_WILL_NOTIFY=1');
setTimeout(main, Number(process.env.EXAMPLE_BOOT_MS || 0));
