//! Preload: with `preload = true`, one template process per generation
//! loads the application once, and the workers are forked from it on
//! request instead of exec'd. The template side of the protocol is in
//! docs/protocol.md ("Preload: the template"); this is drover's side: the
//! templates, their channels, the fork requests.
//!
//! A forked worker is re-parented to drover (a child subreaper while
//! preload is on), and from the answer to its fork request on it is an
//! ordinary `Worker`: the supervisor never sees the difference.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::WaitStatus;

use super::generation::Generation;
use super::pool::backoff;
use super::priority::Boot;
use super::worker::{describe, exit_code, ms, Kill};
use super::Master;
use crate::events::Kind;
use crate::metrics::resident_bytes;
use crate::spawn;

/// How long a template may take to answer a fork request before it is
/// killed and replaced. The loop waits for the answer: a fork takes
/// milliseconds.
pub const FORK_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest message on the channel, either way.
const MAX_MESSAGE: usize = 4096;

/// Where a template is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Loading the application; killed if not ready to fork by the deadline.
    Booting { deadline: Instant },
    /// Answers fork requests.
    Ready,
    /// Not used any more: its channel is closed (it exits on its own), or it
    /// was killed. Its exit is due.
    Gone(Gone),
}

impl State {
    /// For `drover ctl status`: booting, ready, retiring (its channel
    /// closed, it exits), dead (killed, or exiting on its own: a new one
    /// starts after the backoff).
    pub fn name(self) -> &'static str {
        match self {
            State::Booting { .. } => "booting",
            State::Ready => "ready",
            State::Gone(Gone::Retired) => "retiring",
            State::Gone(_) => "dead",
        }
    }
}

/// Why drover gave up a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// Its generation has no worker left: the channel was closed.
    Retired,
    /// It did not report ready within `boot_timeout`: killed.
    BootTimeout,
    /// It did not answer a fork request within `FORK_TIMEOUT`: killed.
    Hung,
    /// It closed the channel (it is exiting).
    Closed,
    /// It sent `READY=1` on the notify socket instead of the channel: the
    /// worker command does not implement the template protocol. Killed.
    NotATemplate,
}

pub struct Template {
    pub gen: Rc<Generation>,
    pub pid: Pid,
    /// drover's end of the channel; None once closed.
    chan: Option<OwnedFd>,
    pub state: State,
    pub started: Instant,
    /// Templates of its generation started before it.
    pub restarts: u32,
    next_request: u64,
    /// Started at its generation's boot priority (`boot_priority`): given
    /// the normal one once ready to fork (or at half its boot_timeout).
    lowered: bool,
    /// Sent SIGABRT at its boot deadline: its process group gets SIGKILL
    /// then (`abort_grace` later) if it is still running, as a worker's.
    kill_at: Option<Instant>,
}

impl Template {
    /// When a template still loading at its boot priority gets the normal
    /// one all the same: half its boot_timeout.
    fn lowered_until(&self) -> Option<Instant> {
        let booting = matches!(self.state, State::Booting { .. });
        (self.lowered && booting).then(|| self.started + self.gen.s.boot_timeout.0 / 2)
    }
}

/// Why a fork request produced no worker.
#[derive(Debug)]
pub enum ForkError {
    /// The template answered `FAILED` (it can still fork).
    Refused(String),
    /// The template is gone or hung: it has been given up (killed if hung).
    Lost(String),
}

/// The templates alive (at most one usable per generation), and the
/// backoff of the next start after one died.
#[derive(Default)]
pub struct Templates {
    pub list: Vec<Template>,
    failures: u32,
    not_before: Option<Instant>,
    subreaper: bool,
    /// The generation of the last template started, and its restarts.
    last_start: Option<(u32, u32)>,
}

/// A template's channel said something.
pub enum Heard {
    Ready {
        pid: Pid,
        generation: u32,
        took: Duration,
    },
    /// It closed the channel.
    Closed { pid: Pid },
}

impl Templates {
    /// The template of `generation` not yet reaped, if any (a generation
    /// gets a new one only once the last one's exit has been reaped).
    pub fn of(&self, generation: u32) -> Option<&Template> {
        self.list.iter().find(|t| t.gen.number == generation)
    }

    pub fn has(&self, pid: Pid) -> bool {
        self.list.iter().any(|t| t.pid == pid)
    }

    pub fn remove(&mut self, pid: Pid) -> Option<Template> {
        let i = self.list.iter().position(|t| t.pid == pid)?;
        Some(self.list.swap_remove(i))
    }

    /// Whether a new template may start now (its backoff is over).
    pub fn may_start(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|t| t <= now)
    }

    /// A template died before it could serve, or while it served: the next
    /// one waits `respawn_delay` × 2^(n−1), at most `respawn_max_delay`.
    pub fn failed(&mut self, gen: &Generation, now: Instant) -> Duration {
        self.failures += 1;
        let delay = backoff(
            self.failures,
            gen.s.respawn_delay.0,
            gen.s.respawn_max_delay.0,
        );
        self.not_before = Some(now + delay);
        delay
    }

    /// Starts the template of `gen` with `start`, which spawns the worker
    /// command with the given extra descriptor placed right after the
    /// listeners (it returns the pid). drover becomes a child subreaper
    /// first: the workers must be re-parented to it.
    pub fn start(
        &mut self,
        gen: Rc<Generation>,
        now: Instant,
        lowered: bool,
        start: impl FnOnce(RawFd) -> Result<Pid, String>,
    ) -> Result<Pid, String> {
        if !self.subreaper {
            super::become_subreaper().map_err(|e| {
                format!("cannot become a child subreaper, which preload needs: {e}")
            })?;
            self.subreaper = true;
            info!("preload: drover is a child subreaper; forked workers are re-parented to it");
        }
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .map_err(|e| format!("cannot create the template's channel: {e}"))?;
        // The template's end is blocking for it: only our end is non-blocking.
        nix::fcntl::fcntl(
            &theirs,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )
        .map_err(|e| format!("cannot set up the template's channel: {e}"))?;
        let pid = start(theirs.as_raw_fd())?;
        drop(theirs);
        info!(
            "template of generation {} (pid {pid}) spawned: loading the application",
            gen.number
        );
        let deadline = now + gen.s.boot_timeout.0;
        let restarts = match self.last_start {
            Some((g, r)) if g == gen.number => r + 1,
            _ => 0,
        };
        self.last_start = Some((gen.number, restarts));
        self.list.push(Template {
            gen,
            pid,
            chan: Some(ours),
            state: State::Booting { deadline },
            started: now,
            restarts,
            next_request: 1,
            lowered,
            kill_at: None,
        });
        Ok(pid)
    }

    /// How many times the template of `generation` was started again
    /// (after one died or was killed).
    fn restarts_of(&self, generation: u32) -> u32 {
        match self.last_start {
            Some((g, r)) if g == generation => r,
            _ => 0,
        }
    }

    /// Whether the template of `generation` is ready to fork.
    pub fn up(&self, generation: u32) -> bool {
        self.list
            .iter()
            .any(|t| t.gen.number == generation && t.state == State::Ready)
    }

    /// For `drover ctl status`: each template, and, when `current` preloads
    /// and has none (it died: a new one starts after the backoff), an entry
    /// that says so, without a pid.
    pub fn status(&self, current: Option<u32>, now: Instant) -> Vec<serde_json::Value> {
        let mut list: Vec<&Template> = self.list.iter().collect();
        list.sort_by_key(|t| t.gen.number);
        let mut out: Vec<_> = list
            .into_iter()
            .map(|t| {
                serde_json::json!({
                    "generation": t.gen.number,
                    "pid": t.pid.as_raw(),
                    "state": t.state.name(),
                    "uptime_s": (now - t.started).as_secs(),
                    "restarts": t.restarts,
                    "rss_bytes": resident_bytes(t.pid.as_raw()),
                    "start_in_ms": null,
                })
            })
            .collect();
        if let Some(g) = current.filter(|g| self.of(*g).is_none()) {
            out.push(serde_json::json!({
                "generation": g,
                "pid": null,
                "state": "dead",
                "uptime_s": null,
                "restarts": self.restarts_of(g),
                "rss_bytes": null,
                "start_in_ms": self.not_before.map_or(0, |t| t.saturating_duration_since(now).as_millis() as u64),
            }));
        }
        out
    }

    /// Descriptors to wait on: the channels of templates not yet ready
    /// (their `READY=1`) or ready (their end of file, when they die).
    pub fn poll_fds(&self) -> impl Iterator<Item = PollFd<'_>> {
        self.list
            .iter()
            .filter_map(|t| t.chan.as_ref())
            .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN))
    }

    /// Reads what the channels have: `READY=1`, `STATUS=`, end of file.
    pub fn read(&mut self, now: Instant) -> Vec<Heard> {
        let mut heard = Vec::new();
        for t in self.list.iter_mut() {
            while let Some(chan) = &t.chan {
                match read_message(chan) {
                    Read::Nothing => break,
                    Read::Closed => {
                        // Its exit is due; a booting one stays booting, for
                        // its exit to be judged as a failed boot.
                        t.chan = None;
                        if t.state == State::Ready {
                            t.state = State::Gone(Gone::Closed);
                        }
                        heard.push(Heard::Closed { pid: t.pid });
                    }
                    Read::Message(fields) => {
                        for (key, value) in fields {
                            match key.as_str() {
                                "READY" if matches!(t.state, State::Booting { .. }) => {
                                    t.state = State::Ready;
                                    self.failures = 0;
                                    heard.push(Heard::Ready {
                                        pid: t.pid,
                                        generation: t.gen.number,
                                        took: now - t.started,
                                    });
                                }
                                "STATUS" => info!("template (pid {}) status: {value}", t.pid),
                                _ => debug!("template (pid {}) sent {key}={value}", t.pid),
                            }
                        }
                    }
                }
            }
        }
        heard
    }

    /// The nearest boot deadline of a template (or SIGKILL after its boot
    /// timeout's SIGABRT), and the end of the backoff if a template is to
    /// start after it (`waiting`).
    pub fn next_deadline(&self, waiting: bool) -> Option<Instant> {
        self.list
            .iter()
            .filter_map(|t| match t.state {
                State::Booting { deadline } => {
                    Some(t.lowered_until().map_or(deadline, |l| l.min(deadline)))
                }
                _ => t.kill_at,
            })
            .chain(self.not_before.filter(|_| waiting))
            .min()
    }

    /// A template spoke on the notify socket. `READY=1` there, while it
    /// should be loading, means the command is an ordinary worker that knows
    /// nothing of preload: it is given up, to be killed. Returns its pid then.
    pub fn on_notify(&mut self, pid: Pid, messages: &[crate::notify::Message]) -> Option<Pid> {
        let t = self.list.iter_mut().find(|t| t.pid == pid)?;
        let ready = messages
            .iter()
            .any(|m| matches!(m, crate::notify::Message::Ready));
        if !(ready && matches!(t.state, State::Booting { .. })) {
            debug!("template (pid {pid}) sent {messages:?} on the notify socket");
            return None;
        }
        t.give_up(Gone::NotATemplate);
        Some(pid)
    }

    /// Templates past their boot deadline, as workers are: SIGABRT (the
    /// template itself: a Python template prints where its import hangs),
    /// then SIGKILL to its process group `abort_grace` later if it is still
    /// running. Returns whom to send which.
    pub fn overdue(&mut self, now: Instant) -> Vec<(Pid, Signal)> {
        let mut late = Vec::new();
        for t in self.list.iter_mut() {
            let (n, pid, s) = (t.gen.number, t.pid, &t.gen.s);
            match t.state {
                State::Booting { deadline } if deadline <= now => {
                    error!(
                        "template of generation {n} (pid {pid}) not ready to fork within \
                         boot_timeout ({}); SIGABRT (a Python template prints where it hangs), \
                         then SIGKILL to its process group in {}",
                        s.boot_timeout, s.abort_grace
                    );
                    t.kill_at = Some(now + s.abort_grace.0);
                    t.give_up(Gone::BootTimeout);
                    late.push((pid, Signal::SIGABRT));
                }
                State::Gone(_) if t.kill_at.is_some_and(|k| k <= now) => {
                    warn!(
                        "template of generation {n} (pid {pid}) still running {} after its \
                         SIGABRT; sending SIGKILL to its process group",
                        s.abort_grace
                    );
                    t.kill_at = None;
                    late.push((pid, Signal::SIGKILL));
                }
                _ => {}
            }
        }
        late
    }

    /// The templates to give their normal priority back (`boot_priority`):
    /// once ready to fork, so that they answer fork requests at once and
    /// the workers they fork boot at drover's priority (little is left to
    /// do after the fork); or at half their boot_timeout, as a worker.
    pub fn ready_to_restore(&mut self, now: Instant) -> Vec<(Pid, Boot)> {
        let mut out = Vec::new();
        for t in self.list.iter_mut() {
            let due = t.state == State::Ready || t.lowered_until().is_some_and(|l| l <= now);
            if let (true, true, Some(boot)) = (t.lowered, due, t.gen.boot) {
                t.lowered = false;
                out.push((t.pid, boot));
            }
        }
        out
    }

    /// Closes the channel of each template that `keep` does not want: it
    /// exits (status 0) when it sees the end of file. One still loading the
    /// app would see it only once loaded, taking CPU from the generation
    /// that replaces it: it is sent SIGTERM too (a template exits 0 on a
    /// stop signal while it loads).
    pub fn retire(&mut self, keep: impl Fn(&Template) -> bool) {
        for t in self.list.iter_mut() {
            if t.chan.is_some() && !matches!(t.state, State::Gone(_)) && !keep(t) {
                debug!(
                    "template of generation {} (pid {}): no worker of its generation left; closing its channel",
                    t.gen.number, t.pid
                );
                if matches!(t.state, State::Booting { .. }) {
                    let _ = nix::sys::signal::kill(t.pid, Signal::SIGTERM);
                }
                t.give_up(Gone::Retired);
            }
        }
    }

    /// Asks the ready template of `generation` for a worker in `slot` and
    /// waits for its answer (at most `FORK_TIMEOUT`). Returns the worker's
    /// pid. A template that died or hung is given up (the caller kills a
    /// hung one: see `ForkError::Lost`).
    /// `env` is more of the worker's environment (its scoreboard record).
    pub fn fork(
        &mut self,
        generation: u32,
        slot: u32,
        env: &[(String, String)],
    ) -> Result<Pid, ForkError> {
        let Some(t) = self
            .list
            .iter_mut()
            .find(|t| t.gen.number == generation && t.state == State::Ready)
        else {
            return Err(ForkError::Lost("no template is ready".into()));
        };
        let id = t.next_request;
        t.next_request += 1;
        let mut request =
            format!("FORK={id}\nENV=DROVER_WORKER_ID={slot}\nENV=DROVER_GENERATION={generation}");
        for (k, v) in env {
            request.push_str(&format!("\nENV={k}={v}"));
        }
        // A worker's, not the template's (`Generation::exits_idle`).
        if t.gen.exits_idle() {
            request.push_str("\nENV=DROVER_EXIT_PRIORITY=idle");
        }
        let result = t.exchange(id, &request);
        if let Err(ForkError::Lost(_)) = &result {
            t.give_up(if t.chan.is_some() {
                Gone::Hung
            } else {
                Gone::Closed
            });
        }
        result
    }
}

impl Template {
    fn give_up(&mut self, why: Gone) {
        self.chan = None;
        self.state = State::Gone(why);
    }

    /// Sends request `id` and reads until its answer.
    fn exchange(&mut self, id: u64, request: &str) -> Result<Pid, ForkError> {
        let Some(chan) = &self.chan else {
            return Err(ForkError::Lost("its channel is closed".into()));
        };
        let fd = chan.as_raw_fd();
        if let Err(e) = send(fd, request.as_bytes(), MsgFlags::MSG_NOSIGNAL) {
            self.chan = None;
            return Err(ForkError::Lost(format!(
                "cannot send the fork request: {e}"
            )));
        }
        let deadline = Instant::now() + FORK_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ForkError::Lost(format!(
                    "no answer to a fork request within {}",
                    ms(FORK_TIMEOUT)
                )));
            }
            let chan = self.chan.as_ref().expect("checked above");
            let mut fds = [PollFd::new(chan.as_fd(), PollFlags::POLLIN)];
            let timeout = PollTimeout::try_from(left.as_millis().clamp(1, 60_000) as i32)
                .unwrap_or(PollTimeout::MAX);
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(ForkError::Lost(format!("poll failed: {e}"))),
            }
            match read_message(chan) {
                Read::Nothing => continue,
                Read::Closed => {
                    self.chan = None;
                    return Err(ForkError::Lost(
                        "it closed its channel (it died?) before answering".into(),
                    ));
                }
                Read::Message(fields) => {
                    if let Some(answer) = answer_to(id, &fields) {
                        return answer;
                    }
                    debug!("template (pid {}) sent {fields:?}", self.pid);
                }
            }
        }
    }
}

/// Why a template's process ended, for its `template_exited` event.
fn exit_cause(state: State) -> &'static str {
    match state {
        State::Gone(Gone::Retired) => "retired",
        State::Booting { .. } => "boot_failed",
        State::Gone(Gone::BootTimeout) => "boot_timeout",
        State::Gone(Gone::Hung) => "hung",
        State::Gone(Gone::NotATemplate) => "not_a_template",
        State::Ready | State::Gone(Gone::Closed) => "exited",
    }
}

/// The answer to request `id` in a message, if it is one.
fn answer_to(id: u64, fields: &[(String, String)]) -> Option<Result<Pid, ForkError>> {
    let get = |key: &str| {
        fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let id = id.to_string();
    if get("FORKED") == Some(&id) {
        return Some(match get("PID").and_then(|p| p.parse::<i32>().ok()) {
            Some(pid) if pid > 1 => Ok(Pid::from_raw(pid)),
            _ => Err(ForkError::Lost(format!(
                "its answer FORKED={id} has no valid PID= ({fields:?})"
            ))),
        });
    }
    if get("FAILED") == Some(&id) {
        let why = get("ERROR").unwrap_or("no reason given");
        return Some(Err(ForkError::Refused(why.to_string())));
    }
    None
}

enum Read {
    Nothing,
    Closed,
    Message(Vec<(String, String)>),
}

/// One packet from a non-blocking channel, as `KEY=VALUE` pairs.
fn read_message(chan: &OwnedFd) -> Read {
    let mut buf = [0u8; MAX_MESSAGE];
    loop {
        return match recv(chan.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => Read::Closed,
            Ok(n) => Read::Message(parse(&buf[..n])),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => Read::Nothing,
            // ECONNRESET and the like: the template is gone.
            Err(_) => Read::Closed,
        };
    }
}

/// Whether notify `messages` are a forked worker's first words
/// (`DROVER_FORKED=ID`).
pub fn forked_unknown(messages: &[crate::notify::Message]) -> bool {
    messages
        .iter()
        .any(|m| matches!(m, crate::notify::Message::Other(l) if l.starts_with("DROVER_FORKED=")))
}

/// `KEY=VALUE` lines; lines without `=` are ignored.
pub fn parse(packet: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(packet)
        .split('\n')
        .filter_map(|line| line.split_once('='))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// The master's side: where the loop meets the templates.

impl Master {
    /// Whether the current generation preloads and has no template that can
    /// serve it: the next start is due after the backoff.
    pub(super) fn template_wanted(&self) -> bool {
        let gen = self.sup.current();
        gen.s.preload && !self.sup.shutting_down() && self.templates.of(gen.number).is_none()
    }

    /// `Action::Spawn` with `preload`: a fork request to the generation's
    /// template. Without a ready template the spawn waits (the loop wakes
    /// up when it is ready), and one is started if there is none.
    pub(super) fn fork_from_template(&mut self, slot: u32, gen: Rc<Generation>, now: Instant) {
        let template = self.templates.of(gen.number).map(|t| (t.pid, t.state));
        match template {
            Some((pid, State::Ready)) => match self.fork_with_record(gen.number, slot) {
                Ok(worker) => {
                    // Its template has its normal priority by now.
                    self.sup.spawned(slot, gen, worker, false, now);
                    // Forked is as far as exec'd: booting, or ready with
                    // ready = "spawn".
                    self.sup.on_exec_report(worker, Ok(()), now);
                }
                Err(ForkError::Refused(why)) => {
                    let e = format!("the template (pid {pid}) could not fork it: {why}");
                    self.sup.spawn_failed(slot, gen.number, false, e, now);
                }
                Err(ForkError::Lost(why)) => {
                    warn!(
                        "template of generation {} (pid {pid}): {why}; killing it, its workers keep serving",
                        gen.number
                    );
                    super::kill_group(pid);
                    // The worker it may have forked is unknown to us (killed
                    // if it speaks, reaped as an orphan if it dies): the
                    // slot counts a failed spawn, and waits for its backoff.
                    self.sup.fork_lost(slot, now);
                    self.sup.spawn_waits();
                }
            },
            // Booting, or none yet (`tend_templates` starts it).
            _ => self.sup.spawn_waits(),
        }
    }

    /// Forks a worker from the template, with its scoreboard record.
    fn fork_with_record(&mut self, generation: u32, slot: u32) -> Result<Pid, ForkError> {
        let io = self.obs.prepare_worker(slot, false);
        match self.templates.fork(generation, slot, &io.env) {
            Ok(pid) => {
                self.obs.worker_started(slot, pid, io);
                Ok(pid)
            }
            Err(e) => {
                self.obs.worker_not_started(io);
                Err(e)
            }
        }
    }

    fn start_template(&mut self, gen: Rc<Generation>, now: Instant) {
        let (mut env, mut fds) = self.worker_env(&gen, 0);
        let channel_fd = 3 + fds.len();
        env.set("DROVER_TEMPLATE_FD", channel_fd.to_string());
        let devnull = self.devnull.as_raw_fd();
        let program = &gen.program;
        // While others serve, it loads the app at the boot priority; ready
        // to fork, it gets the normal one back (`tend_templates`).
        let low = self.sup.boot_priority(&gen);
        let started = self
            .templates
            .start(gen.clone(), now, low.is_some(), |theirs| {
                fds.push(theirs);
                spawn::spawn(program, &env, &fds, devnull, true, low).map_err(|e| e.to_string())
            });
        let started = match started {
            Ok(pid) => {
                self.obs.publish(Kind::TemplateSpawned {
                    pid: pid.as_raw(),
                    generation: gen.number,
                });
                Ok(pid)
            }
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            let cause = format!(
                "the template of generation {} cannot be spawned: {e}",
                gen.number
            );
            if !self
                .sup
                .template_failed(gen.number, true, &cause, None, now)
            {
                let delay = self.templates.failed(&gen, now);
                error!("{cause}; retrying in {}", ms(delay));
            }
        }
    }

    /// What the templates' channels say: ready to fork, or closed.
    pub(super) fn read_templates(&mut self, now: Instant) {
        for heard in self.templates.read(now) {
            match heard {
                Heard::Ready {
                    pid,
                    generation,
                    took,
                } => {
                    info!(
                        "template of generation {generation} (pid {pid}) ready to fork in {}",
                        ms(took)
                    );
                    self.obs.publish(Kind::TemplateReady {
                        pid: pid.as_raw(),
                        generation,
                        seconds: took.as_secs_f64(),
                    });
                }
                Heard::Closed { pid } => {
                    debug!("template (pid {pid}) closed its channel")
                }
            }
        }
    }

    /// Each turn: starts the current generation's template if it has none
    /// (once its backoff is over), kills templates late to boot, and closes
    /// those whose generation has no worker left (all of them once shutting
    /// down).
    pub(super) fn tend_templates(&mut self, now: Instant) {
        if self.template_wanted() && self.templates.may_start(now) {
            let gen = self.sup.current().clone();
            self.start_template(gen, now);
        }
        if self.templates.list.is_empty() {
            return;
        }
        for (pid, signal) in self.templates.overdue(now) {
            if signal == Signal::SIGKILL {
                super::kill_group(pid);
            } else {
                let _ = nix::sys::signal::kill(pid, signal);
            }
        }
        for (pid, boot) in self.templates.ready_to_restore(now) {
            super::restore_priority("template", pid, boot);
        }
        let current = self.sup.current().number;
        let shutting_down = self.sup.shutting_down();
        let pool = &self.sup.pool;
        self.templates.retire(|t| {
            let n = t.gen.number;
            !shutting_down && (n == current || pool.workers.iter().any(|w| w.generation() == n))
        });
    }

    /// A template exited. Its workers are drover's children and keep
    /// serving; the next spawn starts a new template. Before it was ready,
    /// its exit is a worker's that cannot boot.
    pub(super) fn on_template_exit(&mut self, pid: Pid, status: WaitStatus, now: Instant) {
        let Some(t) = self.templates.remove(pid) else {
            return;
        };
        let (n, lived) = (t.gen.number, ms(now - t.started));
        if matches!(t.state, State::Gone(Gone::BootTimeout)) && killpg(pid, Signal::SIGKILL).is_ok()
        {
            // Never ready, so it forked no worker: what is left in its group
            // is what its import started (a worker's group is swept so too).
            warn!("template of generation {n} (pid {pid}) left processes in its process group: sent them SIGKILL");
        }
        let how = match (status, t.state) {
            // Its boot timeout's SIGABRT or SIGKILL, as a worker's.
            (_, State::Gone(Gone::BootTimeout)) => describe(status, Some(Kill::BootTimeout)),
            // drover's own SIGKILL, to a template it gave up: not "the OOM
            // killer or an operator", as describe() says of one unexplained.
            (
                WaitStatus::Signaled(_, Signal::SIGKILL, _),
                State::Gone(Gone::Hung | Gone::NotATemplate),
            ) => "killed by SIGKILL (sent by drover)".to_string(),
            _ => describe(status, None),
        };
        self.obs.publish(Kind::TemplateExited {
            pid: pid.as_raw(),
            generation: n,
            cause: exit_cause(t.state).to_string(),
            status: exit_code(status),
            signal: match status {
                WaitStatus::Signaled(_, sig, _) => Some(sig.as_str().to_string()),
                _ => None,
            },
            description: how.clone(),
        });
        match t.state {
            State::Gone(Gone::Retired) => {
                info!("template of generation {n} (pid {pid}) {how} (retired) after {lived}");
            }
            State::Gone(Gone::NotATemplate) => {
                let cause = format!(
                    "the worker command of generation {n} does not implement preload: it sent \
                     READY=1 on NOTIFY_SOCKET instead of on its DROVER_TEMPLATE_FD channel (pid {pid} \
                     {how}); set preload = false, or run a template-aware worker such as drover-wsgi \
                     (docs/protocol.md, \"Preload: the template\")"
                );
                if !self.sup.template_failed(n, true, &cause, Some(pid), now) {
                    let delay = self.templates.failed(&t.gen, now);
                    error!("{cause}; trying again in {}", ms(delay));
                }
            }
            State::Booting { .. } | State::Gone(Gone::BootTimeout) => {
                let cause = if matches!(t.state, State::Gone(Gone::BootTimeout)) {
                    format!(
                        "the template of generation {n} (pid {pid}) was not ready to fork within \
                         boot_timeout ({}) and {}",
                        t.gen.s.boot_timeout,
                        how.strip_suffix(" (boot timeout)").unwrap_or(&how)
                    )
                } else {
                    format!(
                        "the template of generation {n} (pid {pid}) {how} before it was ready to fork"
                    )
                };
                let cannot_boot = exit_code(status) == Some(3);
                if !self
                    .sup
                    .template_failed(n, cannot_boot, &cause, Some(pid), now)
                {
                    let delay = self.templates.failed(&t.gen, now);
                    error!("{cause}; a new one starts in {}", ms(delay));
                }
            }
            State::Ready | State::Gone(Gone::Hung | Gone::Closed) => {
                if self.sup.shutting_down() || n != self.sup.current().number {
                    info!("template of generation {n} (pid {pid}) {how} after {lived}");
                    return;
                }
                let delay = self.templates.failed(&t.gen, now);
                warn!(
                    "template of generation {n} (pid {pid}) {how} after {lived}; its workers keep \
                     serving; a new template starts in {}",
                    ms(delay)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_matched_to_their_request() {
        let forked = parse(b"FORKED=7\nPID=4242");
        assert_eq!(answer_to(7, &forked).unwrap().unwrap(), Pid::from_raw(4242));
        assert!(
            answer_to(6, &forked).is_none(),
            "an answer to another request"
        );
        let failed = parse(b"FAILED=7\nERROR=cannot fork: Resource temporarily unavailable");
        match answer_to(7, &failed) {
            Some(Err(ForkError::Refused(why))) => assert!(why.contains("Resource")),
            _ => panic!("a refusal"),
        }
        let bad = parse(b"FORKED=7\nPID=x");
        assert!(matches!(answer_to(7, &bad), Some(Err(ForkError::Lost(_)))));
        assert!(answer_to(1, &parse(b"READY=1\nnoise")).is_none());
    }

    #[test]
    fn a_fork_request_is_answered_over_a_socket_pair() {
        // A template in a thread: answers the first request it reads.
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .unwrap();
        let peer = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut fds = [PollFd::new(theirs.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(5000u16)).unwrap();
            let n = recv(theirs.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
            let got = String::from_utf8_lossy(&buf[..n]).to_string();
            send(theirs.as_raw_fd(), b"STATUS=busy", MsgFlags::empty()).unwrap();
            send(theirs.as_raw_fd(), b"FORKED=1\nPID=999", MsgFlags::empty()).unwrap();
            got
        });
        let gen = Rc::new(super::super::generation::for_test(
            3,
            "command = [\"true\"]",
        ));
        let mut t = Template {
            gen,
            pid: Pid::from_raw(1234),
            chan: Some(ours),
            state: State::Ready,
            started: Instant::now(),
            restarts: 0,
            next_request: 1,
            lowered: false,
            kill_at: None,
        };
        assert_eq!(
            t.exchange(1, "FORK=1\nENV=DROVER_WORKER_ID=2").unwrap(),
            Pid::from_raw(999)
        );
        assert_eq!(peer.join().unwrap(), "FORK=1\nENV=DROVER_WORKER_ID=2");
        // The peer is gone now: the next request finds the channel closed.
        assert!(matches!(t.exchange(2, "FORK=2"), Err(ForkError::Lost(_))));
    }
}
