//! The master as the admin endpoint sees it: a read-only view, asked only
//! when a request needs it, for the readiness decision and the metrics.

use std::os::fd::AsFd;

use super::supervisor::Supervisor;
use super::template::Templates;
use crate::admin::Observe;
use crate::metrics::{self, ListenerSample, Snapshot, WorkerSample};
use crate::observe::Observer;
use crate::readiness::NotReady;

/// Borrowed parts of the master.
pub struct View<'a> {
    pub sup: &'a Supervisor,
    pub obs: &'a Observer,
    pub templates: &'a Templates,
}

impl Observe for View<'_> {
    fn readiness(&self) -> Result<(), NotReady> {
        self.sup.readiness()
    }

    fn metrics(&self) -> String {
        let sup = self.sup;
        let current = sup.current();
        let listeners = current.listeners.borrow();
        let workers = sup
            .pool
            .workers
            .iter()
            .map(|w| WorkerSample {
                slot: w.slot,
                pid: w.pid.as_raw(),
                generation: w.generation(),
                state: w.state_name(),
            })
            .collect();
        let uptime = sup.started.elapsed();
        let snapshot = Snapshot {
            version: env!("CARGO_PKG_VERSION"),
            start_time: self.obs.started_at,
            uptime,
            generation: current.number,
            slots: sup.pool.count(),
            ready: self.readiness().is_ok(),
            template_up: current.s.preload.then(|| self.templates.up(current.number)),
            workers,
            listeners: listeners
                .iter()
                .map(|(l, name)| ListenerSample {
                    name: name.clone(),
                    fd: l.fd.as_fd(),
                })
                .collect(),
            counters: &self.obs.counters,
            requests: self.obs.requests(),
        };
        metrics::render(&snapshot)
    }
}
