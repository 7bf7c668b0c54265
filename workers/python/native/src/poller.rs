//! Which pool thread waits in `epoll_wait`: one at a time, the poller.
//!
//! The poller keeps the right to poll while it serves what it took, and
//! polls again once done: under load the next event is usually ready by
//! then, so one running thread serves one connection after the other without
//! sleeping, where a thread woken per event cost a context switch per
//! request (most of the CPU of a `Connection: close` request; the GIL lets
//! one thread run Python at a time anyway). The other threads sleep here.
//! When the poller has been busy for HANDOFF (a slow or blocking app), the
//! right goes to a sleeping thread: the next thread that asks for it takes
//! it, and the timer thread (`watch`) hands it over otherwise (it looks
//! every HANDOFF while the app blocks, every CALM otherwise); so a blocking
//! app still leaves the other threads serving, HANDOFF to CALM later.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long the poller may be busy, blocked (not running nor waiting for a
/// CPU), before another thread takes over; LONG, whatever it does.
pub const HANDOFF: Duration = Duration::from_millis(1);
const LONG: Duration = Duration::from_millis(20);
/// While the app blocks now and then (a hand-over in the last RECENT), the
/// timer thread looks every HANDOFF; else every CALM (each look is a
/// wake-up: a thousand a second cost a fast app about 0.1 context switch
/// per request), so the first hand-over after a calm stretch may wait up
/// to CALM.
const CALM: Duration = Duration::from_millis(10);
const RECENT: Duration = Duration::from_millis(200);
/// The timer thread sleeps longer once it saw the poller idle this many
/// times in a row.
const IDLE_LOOKS: u32 = 20;

#[derive(Default)]
pub struct Poller {
    state: Mutex<State>,
    /// Threads waiting for the right to poll.
    followers: Condvar,
    /// The timer thread, when it sleeps long.
    watch: Condvar,
    watch_asleep: AtomicBool,
}

#[derive(Default)]
struct State {
    holder: Option<usize>,
    /// The holder's thread id (for its state in /proc).
    holder_tid: i32,
    /// The holder serves since (None: it polls, or is about to).
    busy_since: Option<Instant>,
    waiting: usize,
    closed: bool,
    idle_looks: u32,
    last_handoff: Option<Instant>,
    /// Events the poller took in one epoll_wait and has not served yet:
    /// served in order, by whoever polls (a hand-over leaves them to the
    /// next poller).
    ready: VecDeque<u64>,
}

/// What a pool thread does next.
pub enum Next {
    /// The stop: nobody polls any more.
    Stop,
    /// Serve this event (taken earlier; the thread is busy).
    Event(u64),
    /// Wait in epoll_wait, then `took`.
    Poll,
}

impl Poller {
    /// Waits until thread `me` (thread id `tid`) may poll: an event
    /// already taken, or Poll.
    pub fn next(&self, me: usize, tid: i32) -> Next {
        let mut s = self.state.lock().unwrap();
        loop {
            if s.closed {
                return Next::Stop;
            }
            match (s.holder, s.busy_since) {
                (Some(h), _) if h == me => break,
                (None, _) => break,
                // The holder is stuck in a request: take over now.
                (Some(_), Some(since)) if stuck(&s, since, Instant::now()) => {
                    s.last_handoff = Some(Instant::now());
                    break;
                }
                _ => {}
            }
            s.waiting += 1;
            s = self.followers.wait(s).unwrap();
            s.waiting -= 1;
        }
        s.holder = Some(me);
        s.holder_tid = tid;
        match s.ready.pop_front() {
            Some(event) => {
                s.busy_since = Some(Instant::now());
                Next::Event(event)
            }
            None => {
                s.busy_since = None;
                Next::Poll
            }
        }
    }

    /// Thread `me` took `first` and `rest` in one epoll_wait: it serves
    /// `first` now, the rest next (unless another thread takes over).
    pub fn took(&self, me: usize, rest: impl Iterator<Item = u64>) {
        {
            let mut s = self.state.lock().unwrap();
            s.ready.extend(rest);
            if s.holder != Some(me) {
                return;
            }
            s.busy_since = Some(Instant::now());
        }
        if self.watch_asleep.load(Ordering::Acquire) {
            self.watch.notify_one();
        }
    }

    /// Whether thread `me` polls and has events taken and not yet served.
    pub fn holds_ready(&self, me: usize) -> bool {
        let s = self.state.lock().unwrap();
        s.holder == Some(me) && !s.ready.is_empty()
    }

    /// Thread `me` is done with its event: it polls again if it still may.
    pub fn idle(&self, me: usize) {
        let mut s = self.state.lock().unwrap();
        if s.holder == Some(me) {
            s.busy_since = None;
        }
    }

    /// The stop: nobody polls any more; the sleeping threads wake.
    pub fn close(&self) {
        self.state.lock().unwrap().closed = true;
        self.followers.notify_all();
        self.watch.notify_all();
    }

    /// The timer thread's wait, at most `most`: hands the right over when
    /// the poller is busy past HANDOFF and a thread waits for it. True when
    /// the poller was stuck, no thread waited to take over (a pool of one
    /// thread, or every other one busy too) and it `holds` responses: they
    /// are then the timer thread's to send, and it looks again after
    /// HANDOFF. Holding nothing, a stuck poller is looked at as a busy one
    /// (every CALM, unless hand-overs are recent): looking every HANDOFF
    /// through a long request woke the timer thread a thousand times a
    /// second for nothing.
    pub fn watch(&self, most: Duration, holds: bool) -> bool {
        let mut s = self.state.lock().unwrap();
        if s.closed {
            return false;
        }
        let mut alone = false;
        let now = Instant::now();
        let tick = match s.last_handoff {
            Some(t) if now.duration_since(t) < RECENT => HANDOFF,
            _ => CALM,
        };
        let wait = match s.busy_since {
            Some(since) => {
                s.idle_looks = 0;
                if (s.waiting > 0 || holds) && stuck(&s, since, now) {
                    if s.waiting > 0 {
                        s.last_handoff = Some(now);
                        s.holder = None;
                        s.busy_since = None;
                        self.followers.notify_one();
                    } else {
                        alone = true;
                    }
                    HANDOFF
                } else {
                    tick
                }
            }
            None if s.idle_looks < IDLE_LOOKS => {
                s.idle_looks += 1;
                tick
            }
            // Idle for a while: sleep long; the next busy() wakes us.
            None => most,
        };
        let long = wait > CALM;
        self.watch_asleep.store(long, Ordering::Release);
        let _ = self.watch.wait_timeout(s, wait.min(most)).unwrap();
        if long {
            self.watch_asleep.store(false, Ordering::Release);
        }
        alone
    }
}

/// Whether the poller, busy since `since`, should give the right to poll
/// away: it is blocked (the app waits for I/O, a lock, a sleep) past
/// HANDOFF, or busy past LONG. A poller that runs, or waits for a CPU (a
/// busy machine preempted it), keeps it: another thread would only wait
/// for the same CPU, and then for the GIL.
fn stuck(s: &State, since: Instant, now: Instant) -> bool {
    let busy = now.saturating_duration_since(since);
    busy >= LONG || (busy >= HANDOFF && !runnable(s.holder_tid))
}

/// Whether thread `tid` of this process is running or runnable (state R
/// in /proc/self/task/TID/stat); false when unknown.
fn runnable(tid: i32) -> bool {
    let Ok(stat) = std::fs::read(format!("/proc/self/task/{tid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')'.
    let after = stat.iter().rposition(|&b| b == b')').map_or(0, |i| i + 1);
    stat[after..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'R')
}
