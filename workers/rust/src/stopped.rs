//! [`Stopped`]: the stop request as a future, for any async runtime.
//!
//! A signal handler cannot wake a task (wakers are not async-signal-safe), so
//! the first future polled starts one thread, `drover-stop-waker`, which
//! blocks on a pipe of its own that the signal handler (and
//! [`Stop::request`](crate::Stop::request)) writes a byte to; it then wakes the
//! futures whose state was reached. Any number of futures, on any runtime
//! (tokio, async-std, smol, actix's), can wait at once: unlike an `AsyncFd`
//! on [`Stop::fd`](crate::Stop::fd), which an epoll instance accepts once.

use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use crate::stop::{current_state, StopState};

/// The write end of the waker thread's pipe (-1 until a future is polled).
static WAKE_WRITE: AtomicI32 = AtomicI32::new(-1);

/// Futures waiting, by id, with the state each waits for.
struct Waiting {
    next_id: u64,
    started: bool,
    list: Vec<(u64, StopState, Waker)>,
}

static WAITING: Mutex<Waiting> = Mutex::new(Waiting {
    next_id: 1,
    started: false,
    list: Vec::new(),
});

/// A future that completes, with the stop state then, once the state is at
/// least the one asked for: any stop ([`Stop::stopped`](crate::Stop::stopped)),
/// or a quick one ([`Stop::reached`](crate::Stop::reached)`(StopState::Quick)`).
/// `Send`, `Sync`, `Unpin` and `'static`: it can be handed to
/// `axum::serve(..).with_graceful_shutdown`, `tokio::select!` or a spawned task.
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub struct Stopped {
    target: StopState,
    /// Our entry in WAITING, once polled while the state was not reached.
    id: Option<u64>,
}

impl Stopped {
    pub(crate) fn new(target: StopState) -> Stopped {
        Stopped {
            target: target.max(StopState::Graceful),
            id: None,
        }
    }
}

impl Future for Stopped {
    type Output = StopState;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<StopState> {
        let state = current_state();
        if state >= self.target {
            return Poll::Ready(state);
        }
        let mut waiting = WAITING.lock().unwrap_or_else(|e| e.into_inner());
        if !waiting.started {
            if let Err(e) = start_waker_thread() {
                panic!("drover-worker: cannot start the stop waker thread: {e}");
            }
            waiting.started = true;
        }
        // Looked at again under the lock: the waker thread wakes under it
        // after the state changed, so either we see the new state here or it
        // sees our waker.
        let state = current_state();
        if state >= self.target {
            return Poll::Ready(state);
        }
        match self.id {
            Some(id) => {
                if let Some(entry) = waiting.list.iter_mut().find(|e| e.0 == id) {
                    entry.2.clone_from(cx.waker());
                } else {
                    waiting.list.push((id, self.target, cx.waker().clone()));
                }
            }
            None => {
                let id = waiting.next_id;
                waiting.next_id += 1;
                waiting.list.push((id, self.target, cx.waker().clone()));
                self.id = Some(id);
            }
        }
        Poll::Pending
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let mut waiting = WAITING.lock().unwrap_or_else(|e| e.into_inner());
            waiting.list.retain(|e| e.0 != id);
        }
    }
}

/// Called by `stop::record` (from a signal handler): async-signal-safe, an
/// atomic load and a write.
pub(crate) fn notify_waker_thread() {
    let fd = WAKE_WRITE.load(Ordering::SeqCst);
    if fd >= 0 {
        let byte = 1u8;
        // A full pipe (EAGAIN) is fine: the thread has a wake-up pending.
        // SAFETY: writing one byte from a valid local to an fd we own.
        unsafe { libc::write(fd, &byte as *const u8 as *const libc::c_void, 1) };
    }
}

fn start_waker_thread() -> io::Result<()> {
    let (read_fd, write_fd) = crate::stop::self_pipe()?;
    // The thread blocks in read(); the signal handler's write must not block.
    // SAFETY: fcntl on the fd just created.
    unsafe {
        let flags = libc::fcntl(read_fd, libc::F_GETFL);
        libc::fcntl(read_fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
    WAKE_WRITE.store(write_fd, Ordering::SeqCst);
    let spawned = std::thread::Builder::new()
        .name("drover-stop-waker".to_owned())
        .stack_size(256 * 1024) // wakers run executor code
        .spawn(move || wake_loop(read_fd));
    if let Err(e) = spawned {
        WAKE_WRITE.store(-1, Ordering::SeqCst);
        // SAFETY: closing the fds created above, used by no one else.
        unsafe {
            libc::close(read_fd);
            libc::close(write_fd);
        }
        return Err(e);
    }
    Ok(())
}

fn wake_loop(read_fd: RawFd) {
    let mut buf = [0u8; 64];
    loop {
        // SAFETY: reading into a local buffer from our own pipe.
        let n = unsafe { libc::read(read_fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n == 0 {
            return;
        }
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
        let state = current_state();
        let woken: Vec<Waker> = {
            let mut waiting = WAITING.lock().unwrap_or_else(|e| e.into_inner());
            let (due, rest) = std::mem::take(&mut waiting.list)
                .into_iter()
                .partition(|e| state >= e.1);
            waiting.list = rest;
            due.into_iter()
                .map(|e: (u64, StopState, Waker)| e.2)
                .collect()
        };
        woken.into_iter().for_each(Waker::wake);
    }
}

/// Futures waiting now (for the tests).
#[cfg(test)]
pub(crate) fn waiting() -> usize {
    WAITING.lock().unwrap().list.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Stop;
    use std::sync::{mpsc, Arc};
    use std::task::Wake;
    use std::thread;
    use std::time::Duration;

    /// The smallest executor: poll, park until woken.
    fn block_on<F: Future>(f: F) -> F::Output {
        struct Unpark(thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark()
            }
        }
        let waker = Waker::from(Arc::new(Unpark(thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            thread::park();
        }
    }

    fn waiter(future: Stopped) -> mpsc::Receiver<StopState> {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || tx.send(block_on(future)).unwrap());
        rx
    }

    /// Several futures on several threads, woken by the signals (in a child
    /// process: signals and the stop state are process-wide).
    #[test]
    fn futures_complete_at_the_stop_they_wait_for() {
        if !crate::testutil::in_child("futures_complete_at_the_stop_they_wait_for") {
            crate::testutil::run_child(
                "stopped::tests::futures_complete_at_the_stop_they_wait_for",
                &[],
            );
            return;
        }
        let stop = Stop::install();
        let short = Duration::from_millis(100);
        let long = Duration::from_secs(10);

        // A future polled and dropped leaves nothing behind.
        let mut cx = Context::from_waker(Waker::noop());
        let mut dropped = stop.stopped();
        assert_eq!(Pin::new(&mut dropped).poll(&mut cx), Poll::Pending);
        assert_eq!(waiting(), 1);
        drop(dropped);
        assert_eq!(waiting(), 0);

        let graceful = [waiter(stop.stopped()), waiter(stop.stopped())];
        let quick = waiter(stop.reached(StopState::Quick));
        assert!(graceful[0].recv_timeout(short).is_err(), "not stopped yet");
        unsafe { libc::raise(libc::SIGTERM) };
        for rx in &graceful {
            assert_eq!(rx.recv_timeout(long), Ok(StopState::Graceful));
        }
        assert!(quick.recv_timeout(short).is_err(), "graceful is not quick");
        assert_eq!(waiting(), 1, "the quick one still waits");
        assert_eq!(block_on(stop.stopped()), StopState::Graceful, "late future");

        unsafe { libc::raise(libc::SIGQUIT) };
        assert_eq!(quick.recv_timeout(long), Ok(StopState::Quick));
        assert_eq!(waiting(), 0);
        assert_eq!(block_on(stop.reached(StopState::Running)), StopState::Quick);
    }

    /// `Stop::request` wakes the futures as a signal does.
    #[test]
    fn a_request_from_the_program_wakes_them() {
        if !crate::testutil::in_child("a_request_from_the_program_wakes_them") {
            crate::testutil::run_child(
                "stopped::tests::a_request_from_the_program_wakes_them",
                &[],
            );
            return;
        }
        let stop = Stop::install();
        let rx = waiter(stop.stopped());
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
        stop.request(StopState::Graceful);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Ok(StopState::Graceful)
        );
    }
}
