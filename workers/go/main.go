// A drover worker in Go (1.19 or newer), standard library only.
//
//	(cd workers/go && go build -o ../../worker .)
//	drover -w 2 -b 127.0.0.1:8000 --set ready=notify -- ./worker
//
// It serves on the sockets drover passes (LISTEN_FDS, fd 3..), sends
// READY=1 to NOTIFY_SOCKET, drains on SIGTERM and stops at once on SIGQUIT,
// runs its cleanup and exits 0. docs/other-languages.md explains each step.
//
// Routes (any method): / -> "hello from pid N"; /sleep?ms=N -> sleeps N ms,
// then "slept N ms"; anything else 404. Every response has X-Worker-Pid.
// Cleanup: with EXAMPLE_CLEANUP_FILE set, appends "cleanup pid=N" to it.
// EXAMPLE_BOOT_MS=N: a slow start (loading, connecting to a database): N ms
// before it serves.
package main

import (
	"context"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// How long a kept-alive connection may stay idle once the stop began: time
// for a client that is about to reuse it to send its request (answered with
// Connection: close) instead of finding it closed under it.
const idleGrace = time.Second

const maxMs = 3600000

var pid = strconv.Itoa(os.Getpid())

// listeners returns the sockets drover passed: fds 3 .. 3+LISTEN_FDS-1, if
// LISTEN_PID is ours.
func listeners() ([]net.Listener, error) {
	if os.Getenv("LISTEN_PID") != pid {
		return nil, fmt.Errorf("no listening socket from drover (LISTEN_PID is %q, this process is %s)",
			os.Getenv("LISTEN_PID"), pid)
	}
	count, err := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if err != nil || count < 1 {
		return nil, fmt.Errorf("no listening socket from drover (LISTEN_FDS is %q)", os.Getenv("LISTEN_FDS"))
	}
	// Programs this worker starts must not take the sockets too.
	for _, name := range []string{"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"} {
		os.Unsetenv(name)
	}
	var ls []net.Listener
	for fd := 3; fd < 3+count; fd++ {
		f := os.NewFile(uintptr(fd), "listener")
		// FileListener works on a duplicate (close-on-exec, as every
		// descriptor Go opens); closing f leaves that one as the only copy.
		l, err := net.FileListener(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("fd %d: %w", fd, err)
		}
		ls = append(ls, l)
	}
	return ls, nil
}

// notify sends one message to drover: a datagram to NOTIFY_SOCKET.
func notify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil // not under drover (or systemd)
	}
	// A leading '@' is an abstract socket name; Go's net package maps it.
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer conn.Close()
	_, err = conn.Write([]byte(state))
	return err
}

// seconds reads a duration drover writes in seconds ("30", "0.5").
func seconds(name string, fallback time.Duration) time.Duration {
	s, err := strconv.ParseFloat(os.Getenv(name), 64)
	if err != nil || s <= 0 {
		return fallback
	}
	return time.Duration(s * float64(time.Second))
}

// drainTime is how long to drain in-flight requests after a stop signal: 4/5
// of the budget left once a reserve is kept back for the cleanup and the exit
// (the rule of drover's SDKs, docs/workers.md#the-stop-budget).
func drainTime(timeout time.Duration) time.Duration {
	reserve := timeout / 20
	if reserve < 250*time.Millisecond {
		reserve = 250 * time.Millisecond
	}
	if reserve > timeout/2 {
		reserve = timeout / 2
	}
	return (timeout - reserve) * 4 / 5
}

// heartbeats sends WATCHDOG=1 at half of WATCHDOG_USEC when drover expects
// heartbeats (`timeout` set). From a timer, it proves that the process and
// Go's scheduler run, not that no handler is stuck: a worker that can check
// more (its database, a request to itself) should send it from that check.
func heartbeats() {
	usec, err := strconv.Atoi(os.Getenv("WATCHDOG_USEC"))
	if err != nil || usec <= 0 || os.Getenv("WATCHDOG_PID") != pid {
		return
	}
	for range time.Tick(time.Duration(usec) * time.Microsecond / 2) {
		if err := notify("WATCHDOG=1"); err != nil {
			log.Printf("cannot send WATCHDOG=1 to drover: %v", err)
		}
	}
}

func cleanup() {
	if path := os.Getenv("EXAMPLE_CLEANUP_FILE"); path != "" {
		f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			log.Printf("cleanup: %v", err)
			return
		}
		fmt.Fprintf(f, "cleanup pid=%s\n", pid)
		f.Close()
	}
	log.Print("cleanup done")
}

func respond(w http.ResponseWriter, status int, text string) {
	w.Header().Set("Content-Type", "text/plain")
	w.Header().Set("Content-Length", strconv.Itoa(len(text)))
	w.WriteHeader(status)
	w.Write([]byte(text))
}

func app(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/":
		respond(w, 200, "hello from pid "+pid+"\n")
	case "/sleep":
		ms, err := strconv.Atoi(r.URL.Query().Get("ms"))
		if err != nil || ms < 0 || ms > maxMs {
			respond(w, 400, fmt.Sprintf("ms must be a number of milliseconds up to %d\n", maxMs))
			return
		}
		time.Sleep(time.Duration(ms) * time.Millisecond)
		respond(w, 200, fmt.Sprintf("slept %d ms\n", ms))
	default:
		respond(w, 404, "not found\n")
	}
}

func main() {
	log.SetFlags(0)
	log.SetPrefix("go worker[" + pid + "]: ")
	ls, err := listeners()
	if err != nil {
		log.Print(err)
		os.Exit(3) // cannot boot: drover does not respawn it in a loop
	}
	// Tell drover at once that READY=1 will come, so that with ready =
	// "auto" (the default) drover waits for it, however long the start takes.
	if err := notify("X_DROVER_WILL_NOTIFY=1"); err != nil {
		log.Printf("cannot reach drover's NOTIFY_SOCKET: %v", err)
	}
	boot, _ := strconv.Atoi(os.Getenv("EXAMPLE_BOOT_MS"))
	time.Sleep(time.Duration(boot) * time.Millisecond)

	var closing atomic.Bool // answer Connection: close from now on
	var open atomic.Int64   // connections accepted and not yet closed
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Worker-Pid", pid)
			if closing.Load() {
				w.Header().Set("Connection", "close")
			}
			app(w, r)
		}),
		ConnState: func(c net.Conn, state http.ConnState) {
			switch state {
			case http.StateNew:
				open.Add(1)
			case http.StateClosed, http.StateHijacked:
				open.Add(-1)
			}
		},
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       60 * time.Second,
	}
	var serving sync.WaitGroup
	for _, l := range ls {
		serving.Add(1)
		go func(l net.Listener) {
			defer serving.Done()
			srv.Serve(l) // returns when the listener is closed
		}(l)
	}

	// Signals first, then READY=1: drover may send SIGTERM right after it.
	graceful := make(chan os.Signal, 1)
	signal.Notify(graceful, syscall.SIGTERM, syscall.SIGINT)
	quick := make(chan os.Signal, 1)
	signal.Notify(quick, syscall.SIGQUIT)
	// SIGWINCH: drover's pre-stop delay: keep serving, but end keep-alive.
	// (SIGUSR1, "reopen your log files", which drover forwards: Go ignores it
	// unless told otherwise.)
	winch := make(chan os.Signal, 1)
	signal.Notify(winch, syscall.SIGWINCH)
	go func() {
		for range winch {
			closing.Store(true)
		}
	}()

	if err := notify("READY=1\nSTATUS=serving"); err != nil {
		log.Printf("cannot send READY=1 to drover: %v", err)
	}
	go heartbeats()

	var start time.Time
	select {
	case <-graceful:
		start = time.Now()
	case <-quick:
	}
	// Stop accepting: close this process's copy of each socket; the other
	// workers (and, outside a shutdown, drover) keep theirs and take what is
	// queued. (srv.Shutdown would close them too, but it closes the idle
	// kept-alive connections at once, under a client that may be sending its
	// next request on one.)
	closing.Store(true)
	for _, l := range ls {
		l.Close()
	}
	serving.Wait()
	if !start.IsZero() {
		deadline := start.Add(drainTime(seconds("DROVER_GRACEFUL_TIMEOUT", 30*time.Second)))
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		go func() {
			<-quick // drover's escalation (or a quick stop) ends the drain
			cancel()
		}()
		// The grace: kept-alive connections may send one more request.
		graceEnd := start.Add(idleGrace)
		for open.Load() > 0 && time.Now().Before(graceEnd) && ctx.Err() == nil {
			time.Sleep(10 * time.Millisecond)
		}
		// Closes the idle connections and waits for the others to end.
		if err := srv.Shutdown(ctx); err != nil {
			log.Printf("drain deadline: closing the connections still open")
		}
		cancel()
	}
	srv.Close() // whatever is left (a quick stop, the drain deadline)
	cleanup()
	os.Exit(0)
}
