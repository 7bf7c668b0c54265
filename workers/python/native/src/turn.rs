//! The pool's threads take the GIL in the order they ask for it.
//!
//! CPython's GIL is not fair: a thread released from its wait may find it
//! taken again by a thread that just came back for its next request, and it
//! asks for a forced switch only after the switch interval (5 ms); under load
//! a thread can wait several intervals, which was most of the native core's
//! p99 on a Flask app. So a pool thread first waits for its turn here (first
//! come, first served, handed over directly), takes the GIL, and gives the
//! turn to the next thread at once: only one pool thread at a time waits in
//! CPython's queue. The turn is not held while the app runs, so an app that
//! releases the GIL (I/O, sleep) still lets the other threads in.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::Thread;

#[derive(Default)]
pub struct Turns {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    taken: bool,
    waiting: VecDeque<(Thread, Arc<AtomicBool>)>,
}

impl Turns {
    /// Waits for this thread's turn.
    pub fn wait(&self) {
        let granted = {
            let mut s = self.state.lock().unwrap();
            if !s.taken {
                s.taken = true;
                return;
            }
            let granted = Arc::new(AtomicBool::new(false));
            s.waiting
                .push_back((std::thread::current(), granted.clone()));
            granted
        };
        while !granted.load(Ordering::Acquire) {
            std::thread::park();
        }
    }

    /// Gives the turn to the next waiting thread (or frees it).
    pub fn pass(&self) {
        let mut s = self.state.lock().unwrap();
        match s.waiting.pop_front() {
            Some((thread, granted)) => {
                granted.store(true, Ordering::Release);
                thread.unpark();
            }
            None => s.taken = false,
        }
    }
}
