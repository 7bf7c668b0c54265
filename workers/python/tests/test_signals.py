"""install() and install_asyncio(): stop kinds, chaining to the handler the
application installed before, leaving SIGINT alone, and every trigger of the
registry (graceful, quick, Ctrl+C to the process group, normal exit)."""

import os
import signal
import time
import unittest

from tests.helpers import LIMIT, spawn_script, wait_line

# A worker-like script with a drain loop of its own (exit_on_stop=False):
# installs, says "ready", waits for the stop, reports, runs the registry and
# exits 0.
WAIT_AND_CLEAN = """
    import sys, drover_worker as dw
    dw.on_exit(lambda: print("cleanup ran", flush=True), name="c")
    {setup}
    ev = dw.install({args})
    print("ready", flush=True)
    ev.wait()
    print("stop", dw.stop_kind(), flush=True)
    dw.run_cleanup()
"""


def start(setup="", args="exit_on_stop=False", code=None, **kw):
    return spawn_script(code or WAIT_AND_CLEAN.format(setup=setup, args=args), **kw)


def wait_in_select(pid):
    """Until the main thread of ``pid`` sleeps in select() or poll(), as
    Linux's /proc tells (on a system without it, at once)."""
    deadline = time.monotonic() + LIMIT
    while time.monotonic() < deadline:
        try:
            with open("/proc/%d/wchan" % pid) as f:
                where = f.read()
        except OSError:
            return
        if "poll" in where or "select" in where:
            return
        time.sleep(0.01)


def finish(test, p):
    out, err = p.communicate(timeout=LIMIT)
    return p.returncode, out, err


class SignalTest(unittest.TestCase):
    def test_sigterm_is_graceful_and_the_registry_runs(self):
        p = start()
        wait_line(p, "ready")
        p.send_signal(signal.SIGTERM)
        code, out, err = finish(self, p)
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "stop graceful\ncleanup ran\n")

    def test_sigquit_is_quick_and_never_downgraded(self):
        p = start(code="""
            import os, signal, time, drover_worker as dw
            dw.on_exit(lambda: print("cleanup ran", flush=True), name="c")
            dw.install(exit_on_stop=False)
            print("ready", flush=True)
            dw.stop_event.wait()
            time.sleep(0.2)
            print("stop", dw.stop_kind(), flush=True)
            dw.run_cleanup()
        """)
        wait_line(p, "ready")
        p.send_signal(signal.SIGQUIT)
        p.send_signal(signal.SIGTERM)
        code, out, err = finish(self, p)
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "stop quick\ncleanup ran\n")

    def test_a_prior_sigterm_handler_is_chained_after_ours(self):
        setup = """
    import signal
    def app_handler(signum, frame):
        print("app handler saw", dw.stop_kind(), flush=True)
    signal.signal(signal.SIGTERM, app_handler)
"""
        p = start(setup=setup)
        wait_line(p, "ready")
        p.send_signal(signal.SIGTERM)
        code, out, err = finish(self, p)
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "app handler saw graceful\nstop graceful\ncleanup ran\n")

    def test_a_chained_handler_that_exits_waits_for_a_program_that_drains(self):
        # A common way to "exit cleanly on SIGTERM": its SystemExit would
        # unwind the program's drain; with exit_on_stop=False it is logged
        # and the program goes on to its drain and cleanup.
        setup = """
    import signal
    def app_handler(signum, frame):
        print("app handler exits", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, app_handler)
"""
        p = start(setup=setup)
        wait_line(p, "ready")
        p.send_signal(signal.SIGTERM)
        code, out, err = finish(self, p)
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "app handler exits\nstop graceful\ncleanup ran\n")
        self.assertIn("the application's SIGTERM handler raised SystemExit(0): the worker exits once it has "
                      "drained and run its cleanup", err)

    def test_a_chained_handler_that_exits_still_exits_a_plain_script(self):
        setup = """
    import signal
    def app_handler(signum, frame):
        sys.exit(0)
    signal.signal(signal.SIGTERM, app_handler)
"""
        p = start(setup=setup, args="")
        wait_line(p, "ready")
        p.send_signal(signal.SIGTERM)
        code, out, err = finish(self, p)
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "cleanup ran\n", "unwound at the signal, the registry ran at exit")

    def test_a_signal_the_main_thread_does_not_take_ends_its_wait(self):
        # The stop handler runs in the main thread once it runs bytecode
        # again: a signal whose C-level handler ran just before the wait's
        # select() (on a loaded machine) left it there for good. Made
        # deterministic: SIGTERM is blocked in the main thread, so the kernel
        # gives it to the other thread, and sent once the main thread sleeps
        # in the select(), which nothing interrupts then.
        code = """
            import signal, threading, time, drover_worker as dw
            threading.Thread(target=threading.Event().wait, daemon=True).start()
            ev = dw.install(exit_on_stop=False)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            print("ready", flush=True)
            start = time.monotonic()
            ev.wait(5)
            print("stop", dw.stop_kind(), "late" if time.monotonic() - start >= 5 else "in time", flush=True)
        """
        p = start(code=code)
        wait_line(p, "ready")
        wait_in_select(p.pid)
        p.send_signal(signal.SIGTERM)
        code, out, err = finish(self, p)
        self.assertEqual(out, "stop graceful in time\n", err)

    def test_installing_again_chains_a_handler_set_in_between_once(self):
        code = """
            import signal, drover_worker as dw
            dw.install(exit_on_stop=False)
            calls = []
            signal.signal(signal.SIGTERM, lambda s, f: calls.append("app"))
            dw.install(exit_on_stop=False)
            dw.install(exit_on_stop=False)
            print("ready", flush=True)
            dw.stop_event.wait()
            print(calls, dw.stop_kind(), flush=True)
        """
        p = start(code=code)
        wait_line(p, "ready")
        p.send_signal(signal.SIGTERM)
        code, out, err = finish(self, p)
        self.assertEqual(out, "['app'] graceful\n", err)

    def test_sigint_false_leaves_sigint_alone(self):
        p = start(args="sigint=False", code="""
            import signal, drover_worker as dw
            dw.install(sigint=False)
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            try:
                print("ready", flush=True)
                dw.stop_event.wait(10)
                print("no interrupt", flush=True)
            except KeyboardInterrupt:
                print("KeyboardInterrupt", dw.stop_kind(), flush=True)
        """)
        wait_line(p, "ready")
        p.send_signal(signal.SIGINT)
        code, out, err = finish(self, p)
        self.assertEqual(out, "KeyboardInterrupt None\n", err)

    def test_sigint_is_graceful_instead_of_keyboardinterrupt(self):
        p = start()
        wait_line(p, "ready")
        p.send_signal(signal.SIGINT)
        code, out, err = finish(self, p)
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "stop graceful\ncleanup ran\n")
        self.assertNotIn("KeyboardInterrupt", err)

    def test_a_child_the_app_forks_ends_at_sigterm(self):
        # multiprocessing's Process.terminate() sends SIGTERM: the worker's
        # stop handlers, inherited, made the child ignore it.
        p = start(code="""
            import multiprocessing, time, drover_worker as dw
            def child():
                time.sleep(30)
            dw.install(exit_on_stop=False)
            c = multiprocessing.get_context("fork").Process(target=child)
            c.start()
            time.sleep(0.2)
            c.terminate()
            c.join(5)
            print("child", c.exitcode, "worker", dw.stop_kind(), flush=True)
            if c.exitcode is None:
                c.kill()
        """)
        code, out, err = finish(self, p)
        self.assertEqual(out, "child -15 worker None\n", err)

    def test_a_child_forked_under_install_asyncio_ends_at_sigterm_alone(self):
        # The loop's wakeup fd is shared with the child: the child's SIGTERM
        # also reached the worker's loop, which stopped.
        p = start(code="""
            import asyncio, multiprocessing, time, drover_worker as dw
            def child():
                time.sleep(30)
            async def main():
                dw.install_asyncio()
                c = multiprocessing.get_context("fork").Process(target=child)
                c.start()
                await asyncio.sleep(0.2)
                c.terminate()
                for _ in range(500):
                    if c.exitcode is not None:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)
                print("child", c.exitcode, "worker", dw.stop_kind(), flush=True)
                if c.exitcode is None:
                    c.kill()
            asyncio.run(main())
        """)
        code, out, err = finish(self, p)
        self.assertEqual(out, "child -15 worker None\n", err)

    def test_sigint_ignored_at_install_stays_ignored(self):
        p = start(code="""
            import signal, drover_worker as dw
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            dw.install(exit_on_stop=False)
            print("ready", signal.getsignal(signal.SIGINT) == signal.SIG_IGN, flush=True)
            dw.stop_event.wait(10)
            print("stop", dw.stop_kind(), flush=True)
        """)
        lines = wait_line(p, "ready")
        self.assertIn("ready True", lines[-1])
        p.send_signal(signal.SIGINT)
        p.send_signal(signal.SIGTERM)
        code, out, err = finish(self, p)
        self.assertEqual(out, "stop graceful\n", err)

    def test_ctrl_c_to_the_process_group_runs_the_cleanup(self):
        p = start(start_new_session=True)
        wait_line(p, "ready")
        os.killpg(p.pid, signal.SIGINT)  # as a terminal does
        code, out, err = finish(self, p)
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "stop graceful\ncleanup ran\n")

    def test_exit_on_stop_unwinds_and_cleans_up_at_exit(self):
        p = start(code="""
            import os, time, drover_worker as dw
            # os.write: the SystemExit may interrupt anything, buffered I/O too.
            dw.on_exit(lambda: os.write(1, b"cleanup ran\\n"), name="c")
            dw.install(exit_on_stop=True)
            try:
                os.write(1, b"ready\\n")
                while True:
                    time.sleep(1)
            finally:
                os.write(1, b"finally\\n")
        """)
        wait_line(p, "ready")
        p.send_signal(signal.SIGTERM)
        code, out, err = finish(self, p)
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "finally\ncleanup ran\n")

    def test_a_plain_script_stops_by_default(self):
        # install() with no arguments: a script that never looks at the stop
        # event still stops on SIGTERM, SIGINT or SIGQUIT and cleans up.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            with self.subTest(sig=sig):
                p = start(code="""
                    import os, time, drover_worker as dw
                    dw.on_exit(lambda: os.write(1, b"cleanup ran\\n"), name="c")
                    dw.install()
                    os.write(1, b"ready\\n")
                    while True:
                        time.sleep(1)
                """)
                wait_line(p, "ready")
                p.send_signal(sig)
                code, out, err = finish(self, p)
                self.assertEqual(code, 0, err)
                self.assertEqual(out, "cleanup ran\n")

    def test_a_second_signal_does_not_cut_the_registry_short(self):
        # drover escalates with SIGQUIT while the registry runs: every
        # function still runs, within the (now quick) budget.
        p = start(code="""
            import os, time, drover_worker as dw
            dw.on_exit(lambda: os.write(1, b"first ran\\n"), name="first")
            def slow():
                os.write(1, b"slow started\\n")
                time.sleep(0.5)
                os.write(1, b"slow done\\n")
            dw.on_exit(slow, name="slow")
            dw.install()
            os.write(1, b"ready\\n")
            while True:
                time.sleep(1)
        """, env={"DROVER_QUICK_TIMEOUT": "5"})
        wait_line(p, "ready")
        p.send_signal(signal.SIGTERM)
        wait_line(p, "slow started")
        p.send_signal(signal.SIGQUIT)
        p.send_signal(signal.SIGTERM)
        code, out, err = finish(self, p)
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "slow done\nfirst ran\n", err)
        self.assertNotIn("ran out", err)
        self.assertNotIn("Traceback", err)

    def test_no_systemexit_while_the_registry_runs(self):
        # run_cleanup() called by the program, then a first signal during it.
        p = start(code="""
            import os, time, drover_worker as dw
            dw.on_exit(lambda: os.write(1, b"first ran\\n"), name="first")
            def slow():
                os.write(1, b"ready\\n")
                time.sleep(0.5)
            dw.on_exit(slow, name="slow")
            dw.install()
            dw.run_cleanup()
            os.write(1, b"after cleanup\\n")
        """)
        wait_line(p, "ready")
        p.send_signal(signal.SIGTERM)
        code, out, err = finish(self, p)
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "first ran\nafter cleanup\n", err)

    def test_a_thread_waiting_on_the_event_wakes_up(self):
        p = start(code="""
            import threading, drover_worker as dw
            dw.install(exit_on_stop=False)
            t = threading.Thread(target=lambda: (dw.stop_event.wait(), print("thread woke", flush=True)))
            t.start()
            print("ready", flush=True)
            t.join()
        """)
        wait_line(p, "ready")
        p.send_signal(signal.SIGTERM)
        code, out, err = finish(self, p)
        self.assertEqual(out, "thread woke\n", err)

    def test_stop_fd_becomes_readable_and_stays(self):
        p = start(code="""
            import select, drover_worker as dw
            dw.install(exit_on_stop=False)
            print("ready", flush=True)
            select.select([dw.stop_fd()], [], [])
            r, _, _ = select.select([dw.stop_fd()], [], [], 0)
            print("readable", bool(r), dw.stop_kind(), flush=True)
        """)
        wait_line(p, "ready")
        p.send_signal(signal.SIGQUIT)
        code, out, err = finish(self, p)
        self.assertEqual(out, "readable True quick\n", err)

    def test_install_asyncio(self):
        p = start(code="""
            import asyncio, signal, drover_worker as dw
            dw.on_exit(lambda: print("cleanup ran", flush=True), name="c")
            signal.signal(signal.SIGTERM, lambda s, f: print("app handler", flush=True))
            async def main():
                ev = dw.install_asyncio()
                print("ready", flush=True)
                await ev.wait()
                print("stop", dw.stop_kind(), dw.stop_event.is_set(), flush=True)
            asyncio.run(main())
        """)
        wait_line(p, "ready")
        p.send_signal(signal.SIGTERM)
        code, out, err = finish(self, p)
        self.assertEqual(code, 0, err)
        # The chained handler runs in our callback, before the coroutine resumes.
        self.assertEqual(out, "app handler\nstop graceful True\ncleanup ran\n")

    def test_install_asyncio_chains_loop_handlers_added_before_and_after(self):
        # The bug of issue 13: a handler from loop.add_signal_handler (as
        # aiohttp's run_app installs) was replaced, so the app never stopped.
        # (One line per wait_line: the reader must not buffer past it.)
        p = start(code="""
            import asyncio, signal, drover_worker as dw
            async def main():
                loop = asyncio.get_running_loop()
                app_stop = asyncio.Event()
                calls = []
                def app_handler(name):
                    calls.append(name)
                    app_stop.set()
                loop.add_signal_handler(signal.SIGTERM, app_handler, "before")
                dw.install_asyncio()
                dw.install_asyncio()  # again: still one call each
                loop.add_signal_handler(signal.SIGINT, app_handler, "after")
                loop.add_signal_handler(signal.SIGQUIT, app_handler, "removed")
                print("ready, removed", loop.remove_signal_handler(signal.SIGQUIT), flush=True)
                await app_stop.wait()
                app_stop.clear()
                print("stop", dw.stop_kind(), calls, flush=True)
                await app_stop.wait()
                print("again", calls, flush=True)
            asyncio.run(main())
            # Closing the loop removed every handler it had, ours included.
            print("closed", signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, flush=True)
        """)
        self.assertEqual(wait_line(p, "ready"), ["ready, removed True\n"])
        p.send_signal(signal.SIGTERM)
        self.assertEqual(wait_line(p, "stop"), ["stop graceful ['before']\n"])
        p.send_signal(signal.SIGINT)
        code, out, err = finish(self, p)
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "again ['before', 'after']\nclosed True\n")

    def test_after_asyncio_run_a_second_signal_does_not_kill_the_cleanup(self):
        # asyncio.run() closes its loop, which resets the signals it handled
        # to their default action; the registry runs after that, at exit.
        p = start(code="""
            import asyncio, os, time, drover_worker as dw
            dw.on_exit(lambda: os.write(1, b"first ran\\n"), name="first")
            def slow():
                os.write(1, b"slow started\\n")
                time.sleep(0.5)
                os.write(1, b"slow done\\n")
            dw.on_exit(slow, name="slow")
            async def main():
                ev = dw.install_asyncio()
                os.write(1, b"ready\\n")
                await ev.wait()
            asyncio.run(main())
        """, env={"DROVER_QUICK_TIMEOUT": "5"})
        wait_line(p, "ready")
        p.send_signal(signal.SIGTERM)
        wait_line(p, "slow started")
        p.send_signal(signal.SIGQUIT)
        code, out, err = finish(self, p)
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "slow done\nfirst ran\n", err)


if __name__ == "__main__":
    unittest.main()


class LauncherAbortTest(unittest.TestCase):
    def test_sigabrt_during_the_import_prints_where_it_hangs(self):
        # drover's boot_timeout sends SIGABRT to a worker still importing its
        # app: every launcher (drover-uvicorn, drover-granian, drover-hypercorn
        # as well as drover-wsgi) must say where it hangs.
        p = spawn_script("""
            import time, drover_worker as dw
            dw.begin_launch(None, print)
            def stuck_in_the_import():
                print("importing", flush=True)
                time.sleep(100)
            stuck_in_the_import()
        """)
        wait_line(p, "importing")
        p.send_signal(signal.SIGABRT)
        _, err = p.communicate(timeout=LIMIT)
        self.assertEqual(p.returncode, -signal.SIGABRT, err)
        self.assertIn("in stuck_in_the_import", err)
