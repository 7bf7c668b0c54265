"""The cleanup registry: order, once only, isolation of errors, the budget,
registration from threads, and the decorator forms. Each case runs in a fresh
interpreter, since the registry is per process and also runs at exit."""

import time
import unittest

from tests.helpers import run_script


class RegistryTest(unittest.TestCase):
    def test_last_registered_runs_first(self):
        r = run_script("""
            import drover_worker as dw
            for name in "abc":
                dw.register(name, lambda name=name: print("ran", name))
            dw.run_cleanup()
            print("after")
        """)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.split("\n")[:4], ["ran c", "ran b", "ran a", "after"])

    def test_runs_once_in_total_also_with_atexit(self):
        r = run_script("""
            import drover_worker as dw
            dw.register("count", lambda: print("ran"))
            dw.run_cleanup()
            dw.run_cleanup()
            dw.register("late", lambda: print("late ran"))
            dw.run_cleanup()
        """)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.count("ran"), 1, r.stdout)
        self.assertIn("'late' registered after cleanup started; it will not run", r.stderr)

    def test_runs_at_normal_interpreter_exit(self):
        r = run_script("""
            import sys, drover_worker as dw
            @dw.on_exit
            def flush():
                print("flushed")
            print("main done")
            sys.exit(5)
        """)
        self.assertEqual(r.returncode, 5)
        self.assertEqual(r.stdout, "main done\nflushed\n")

    def test_runs_at_exit_after_an_uncaught_exception(self):
        r = run_script("""
            import drover_worker as dw
            dw.on_exit(lambda: print("cleaned"), name="c")
            raise SystemError("crash")
        """)
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stdout, "cleaned\n")

    def test_an_exception_is_logged_with_its_name_and_the_rest_run(self):
        r = run_script("""
            import drover_worker as dw
            dw.register("first", lambda: print("first ran"))
            def bad():
                raise KeyError("disk full")
            dw.register("bad-one", bad)
            dw.register("last", lambda: print("last ran"))
            print("ok" if dw.run_cleanup() else "budget")
        """)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, "last ran\nfirst ran\nok\n")
        self.assertIn("cleanup 'bad-one' failed:", r.stderr)
        self.assertIn("Traceback (most recent call last):", r.stderr)
        self.assertIn("KeyError: 'disk full'", r.stderr)

    def test_the_budget_abandons_a_slow_function(self):
        began = time.monotonic()
        r = run_script("""
            import time, drover_worker as dw
            dw.register("never-started", lambda: print("should not run"))
            dw.register("slow", lambda: time.sleep(30))
            dw.register("quick", lambda: print("quick ran"))
            t = time.monotonic()
            finished = dw.run_cleanup()
            print("returned after %.1f finished=%s" % (time.monotonic() - t, finished))
        """, env={"DROVER_GRACEFUL_TIMEOUT": "0.75"})  # less the 0.25 s reserve
        self.assertLess(time.monotonic() - began, 10)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("quick ran", r.stdout)
        self.assertNotIn("should not run", r.stdout)
        self.assertIn("returned after 0.5 finished=False", r.stdout)
        self.assertIn(
            "cleanup budget of 0.5s ran out while 'slow' was still running; abandoned it; "
            "not started: never-started", r.stderr)

    def test_the_budget_counts_from_the_stop_request(self):
        r = run_script("""
            import time, drover_worker as dw
            began = time.monotonic()
            dw.request_stop("graceful")
            time.sleep(0.6)
            left = dw.remaining_budget()
            print("%.2f %.1f" % (time.monotonic() - began, left + time.monotonic() - began))
        """, env={"DROVER_GRACEFUL_TIMEOUT": "2.75"})  # less the 0.25 s reserve
        # What is left plus what has passed is the budget, however long the
        # sleep took on a loaded machine.
        slept, total = r.stdout.split()
        self.assertGreaterEqual(float(slept), 0.6)
        self.assertEqual(total, "2.5")

    def test_the_budget_counts_from_stopping_in_a_recycle(self):
        # drover kills a worker graceful_timeout after its STOPPING=1: a
        # worker that recycles itself (no stop request) counts its budget from
        # there, not from "now" each time it asks (no deadline at all).
        r = run_script("""
            import time, drover_worker as dw
            began = time.monotonic()
            dw.stopping()  # NOTIFY_SOCKET unset: not sent, still counted
            time.sleep(0.6)
            dw.stopping()  # the first one counts
            drain = dw.drain_deadline() - began
            print("%.1f %.1f" % (dw.remaining_budget() + time.monotonic() - began, drain))
            dw.request_stop("graceful")  # a stop after it does not move it on
            print("%.1f" % (dw.remaining_budget() + time.monotonic() - began))
        """, env={"DROVER_GRACEFUL_TIMEOUT": "2.75"})
        self.assertEqual(r.stdout.split("\n")[:2], ["2.5 2.0", "2.5"], r.stderr)

    def test_an_exit_without_teardown_ends_idle_thread_pools(self):
        # drover-granian exits so once drained: an idle ThreadPoolExecutor's
        # worker thread (not a daemon) ends only at threading's own atexit.
        r = run_script("""
            import atexit, concurrent.futures, drover_worker as dw
            pool = concurrent.futures.ThreadPoolExecutor(2)
            print(pool.submit(lambda: "task ran").result())
            atexit.register(lambda: print("atexit ran", flush=True))
            dw._exit_skipping_teardown(wait_for_threads=True)
        """, timeout=10)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, "task ran\natexit ran\n")

    def test_the_reserve(self):
        r = run_script("""
            import drover_worker as dw
            print(dw.reserve(30), dw.reserve(2), dw.reserve(5), dw.reserve(0.3), dw.reserve(0))
        """)
        self.assertEqual(r.stdout.strip(), "1.5 0.25 0.25 0.15 0.0")

    def test_time_left_follows_drover_deadlines(self):
        r = run_script("""
            import drover_worker as dw
            t = lambda *a: "%.2f/%.2f" % dw._time_left(10, 2, *a)
            print(t(None, None), t(1, None), t(2, 0), t(1, 1), t(60, None), t(9, 0))
        """)
        # (drain/cleanup): not stopping; 1 s into a graceful stop; escalated
        # then (2 s - 0.25 s); quick with graceful time to spare; past every
        # deadline; a quick deadline later than the graceful one.
        self.assertEqual(r.stdout.strip(), "7.60/9.50 6.60/8.50 1.40/1.75 0.40/0.75 0.00/0.00 0.00/0.50")

    def test_a_quick_stop_uses_the_quick_timeout(self):
        r = run_script("""
            import time, drover_worker as dw
            near = lambda a, b: abs(a - b) < 0.1
            dw.request_stop("graceful")
            print(near(dw.remaining_budget(), 19), near(dw.drain_deadline() - time.monotonic(), 15.2))
            dw.request_stop("quick")
            print(near(dw.remaining_budget(), 1.75), near(dw.drain_deadline() - time.monotonic(), 1.4))
            print(dw.quick_timeout("x"))
        """, env={"DROVER_GRACEFUL_TIMEOUT": "20", "DROVER_QUICK_TIMEOUT": "2"})
        self.assertEqual(r.stdout.split("\n")[:3], ["True True", "True True", "5.0"], r.stderr)
        self.assertIn("DROVER_QUICK_TIMEOUT='x' is not a number of seconds", r.stderr)

    def test_an_escalation_shortens_a_running_cleanup(self):
        r = run_script("""
            import os, signal, threading, time, drover_worker as dw
            dw.request_stop("graceful")
            started = threading.Event()
            dw.register("hangs", lambda: (started.set(), time.sleep(30)))
            threading.Thread(target=lambda: (started.wait(), dw.request_stop("quick")), daemon=True).start()
            t = time.monotonic()
            print(dw.run_cleanup(), "%.0f" % (time.monotonic() - t))
        """, env={"DROVER_GRACEFUL_TIMEOUT": "30", "DROVER_QUICK_TIMEOUT": "1"})
        self.assertEqual(r.stdout.strip(), "False 1", r.stderr)
        self.assertIn("ran out while 'hangs' was still running", r.stderr)

    def test_no_thread_at_exit_still_enforces_the_budget(self):
        # Python 3.12+ cannot start a thread at interpreter exit; simulated
        # here. The registry runs on the main thread and SIGALRM interrupts
        # the function running at the budget's end.
        began = time.monotonic()
        r = run_script("""
            import atexit, os, signal
            prior = lambda s, f: None
            signal.signal(signal.SIGALRM, prior)
            # Registered before drover_worker's own hook: runs after it.
            atexit.register(lambda: os.write(1, b"restored %s\\n" % str(signal.getsignal(signal.SIGALRM) is prior).encode()))
            import threading, time, drover_worker as dw
            def no_thread(self):
                raise RuntimeError("can't create new thread at interpreter shutdown")
            threading.Thread.start = no_thread
            dw.register("never-started", lambda: os.write(1, b"should not run\\n"))
            def hangs():
                try:
                    time.sleep(30)
                finally:
                    os.write(1, b"hangs interrupted\\n")
            dw.register("hangs", hangs)
            dw.register("quick", lambda: os.write(1, b"quick ran\\n"))
        """, env={"DROVER_GRACEFUL_TIMEOUT": "0.75"})
        self.assertLess(time.monotonic() - began, 10)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, "quick ran\nhangs interrupted\nrestored True\n", r.stderr)
        self.assertIn("running cleanup on the main thread, with SIGALRM", r.stderr)
        self.assertIn("cleanup budget of 0.5s ran out while 'hangs' was still running; interrupted it; "
                      "not started: never-started", r.stderr)

    def test_graceful_timeout_parsing(self):
        r = run_script("""
            import drover_worker as dw
            print(dw.graceful_timeout("1.5"), dw.graceful_timeout(None), dw.graceful_timeout("x"))
        """)
        self.assertEqual(r.stdout.strip(), "1.5 30.0 30.0")
        self.assertIn("DROVER_GRACEFUL_TIMEOUT='x' is not a number of seconds", r.stderr)

    def test_decorator_and_function_forms(self):
        r = run_script("""
            import drover_worker as dw
            @dw.on_exit
            def plain(): print("plain")
            @dw.on_exit("named")
            def f2(): print("named")
            @dw.on_exit(name="kw")
            def f3(): print("kw")
            dw.on_exit(lambda: print("fn"), name="fn")
            def bad(): raise ValueError("x")
            dw.on_exit(bad)
            assert plain.__name__ == "plain"   # the decorator returns the function
            dw.run_cleanup()
        """)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.split(), ["fn", "kw", "named", "plain"])
        self.assertIn("cleanup 'bad' failed", r.stderr)

    def test_registering_from_many_threads(self):
        r = run_script("""
            import threading, drover_worker as dw
            ran = []
            def reg(i):
                for j in range(50):
                    dw.register("t%d-%d" % (i, j), lambda: ran.append(1))
            ts = [threading.Thread(target=reg, args=(i,)) for i in range(8)]
            [t.start() for t in ts]
            [t.join() for t in ts]
            dw.run_cleanup()
            print(len(ran))
        """)
        self.assertEqual(r.stdout.strip(), "400", r.stderr)

    def test_a_concurrent_run_waits_for_the_first(self):
        r = run_script("""
            import threading, time, drover_worker as dw
            done = []
            dw.register("slow", lambda: (time.sleep(0.3), done.append(1)))
            t = threading.Thread(target=dw.run_cleanup)
            t.start()
            time.sleep(0.05)
            dw.run_cleanup()
            print("done" if done else "returned early")
            t.join()
        """)
        self.assertEqual(r.stdout.strip(), "done", r.stderr)

    def test_a_cleanup_function_calling_run_cleanup_does_not_deadlock(self):
        r = run_script("""
            import drover_worker as dw
            dw.register("reentrant", lambda: dw.run_cleanup())
            dw.register("other", lambda: print("other"))
            dw.run_cleanup()
            print("end")
        """, timeout=10)
        self.assertEqual(r.stdout.split(), ["other", "end"], r.stderr)


if __name__ == "__main__":
    unittest.main()
