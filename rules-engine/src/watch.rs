//! Hot reload: a shared handle to the current rule set, and a watcher that swaps it when the
//! rules directory changes (or on SIGHUP), keeping the old set when the new files are invalid.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::RulesError;
use crate::compile::dir_version;
use crate::engine::{RuleSet, UnmatchedCounter};

/// A cheap-to-clone handle to the current [`RuleSet`]; readers never block the swap.
#[derive(Clone, Debug)]
pub struct RulesHandle {
    current: Arc<ArcSwap<RuleSet>>,
    status: Arc<watch::Sender<ReloadStatus>>,
}

/// The outcome of the latest reload attempt (for health checks and tests).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReloadStatus {
    /// Reload attempts so far (changes, SIGHUPs, polls that saw a new hash).
    pub attempts: u64,
    /// Version in force after the attempt.
    pub version: String,
    /// The error of the latest attempt, with file:line:column, if it failed.
    pub error: Option<String>,
}

impl RulesHandle {
    pub fn new(set: RuleSet) -> Self {
        let status = ReloadStatus {
            version: set.version().to_owned(),
            ..ReloadStatus::default()
        };
        RulesHandle {
            current: Arc::new(ArcSwap::from_pointee(set)),
            status: Arc::new(watch::channel(status).0),
        }
    }

    /// Follows reload attempts.
    pub fn subscribe(&self) -> watch::Receiver<ReloadStatus> {
        self.status.subscribe()
    }

    /// The latest reload outcome.
    pub fn status(&self) -> ReloadStatus {
        self.status.borrow().clone()
    }

    /// Loads `dir` and wraps it in a handle.
    pub fn load_dir(dir: &Path) -> Result<Self, RulesError> {
        RuleSet::load_dir(dir).map(Self::new)
    }

    /// The rule set in force now. Hold it for a batch so all its events share one version.
    pub fn current(&self) -> Arc<RuleSet> {
        self.current.load_full()
    }

    /// The unmatched-event counts (they carry over reloads).
    pub fn unmatched(&self) -> Arc<UnmatchedCounter> {
        self.current.load().unmatched().clone()
    }

    /// Makes `set` current, keeping the unmatched counts.
    pub fn store(&self, set: RuleSet) {
        let set = set.with_unmatched(self.unmatched());
        self.current.store(Arc::new(set));
    }

    /// Reloads `dir`; swaps only if it compiles and its version differs (or `force`).
    /// Returns whether the set was swapped.
    pub fn reload(&self, dir: &Path, force: bool) -> Result<bool, RulesError> {
        let result = RuleSet::load_dir(dir).map(|set| {
            if !force && set.version() == self.current.load().version() {
                return false;
            }
            self.store(set);
            true
        });
        let version = self.current.load().version().to_owned();
        let error = result.as_ref().err().map(ToString::to_string);
        self.status.send_modify(|s| {
            s.attempts += 1;
            s.version = version;
            s.error = error;
        });
        result
    }
}

/// Tuning of [`spawn_watcher_with`].
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Quiet time after the last change before reloading.
    pub debounce: Duration,
    /// Also compare the directory's content hash this often (catches missed notifications).
    pub poll_interval: Option<Duration>,
    /// Reload on SIGHUP.
    pub sighup: bool,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            debounce: Duration::from_millis(250),
            poll_interval: Some(Duration::from_secs(30)),
            sighup: true,
        }
    }
}

/// Watches `dir` with default options; see [`spawn_watcher_with`].
pub fn spawn_watcher(
    dir: PathBuf,
    handle: RulesHandle,
    cancel: CancellationToken,
) -> Result<JoinHandle<()>, RulesError> {
    spawn_watcher_with(dir, handle, cancel, WatchOptions::default())
}

/// Watches `dir` itself (editors and ConfigMaps replace files by rename) and swaps in the reloaded
/// set, keeping the old one when the new is invalid. Needs a tokio runtime; ends on `cancel`.
pub fn spawn_watcher_with(
    dir: PathBuf,
    handle: RulesHandle,
    cancel: CancellationToken,
    opts: WatchOptions,
) -> Result<JoinHandle<()>, RulesError> {
    let (tx, rx) = mpsc::channel::<()>(1);
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(ev) if is_change(&ev.kind) => {
                let _ = tx.try_send(());
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "rules watcher error"),
        })
        .map_err(|source| RulesError::Watch {
            path: dir.clone(),
            source,
        })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| RulesError::Watch {
            path: dir.clone(),
            source,
        })?;
    let sighup = if opts.sighup { hangup() } else { None };
    Ok(tokio::spawn(run(
        dir, handle, cancel, opts, rx, sighup, watcher,
    )))
}

/// Whether a notification may mean changed content (our own reads are not changes).
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

#[cfg(unix)]
type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangup = ();

#[cfg(unix)]
fn hangup() -> Option<Hangup> {
    use tokio::signal::unix::{SignalKind, signal};
    signal(SignalKind::hangup())
        .map_err(|e| tracing::warn!(error = %e, "cannot listen for SIGHUP"))
        .ok()
}

#[cfg(not(unix))]
fn hangup() -> Option<Hangup> {
    None
}

async fn next_hangup(h: &mut Option<Hangup>) {
    #[cfg(unix)]
    if let Some(s) = h {
        if s.recv().await.is_some() {
            return;
        }
        *h = None;
    }
    let _ = h;
    std::future::pending::<()>().await
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn tick_opt(poll: &mut Option<tokio::time::Interval>) {
    match poll {
        Some(p) => {
            p.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn run(
    dir: PathBuf,
    handle: RulesHandle,
    cancel: CancellationToken,
    opts: WatchOptions,
    mut rx: mpsc::Receiver<()>,
    mut sighup: Option<Hangup>,
    _watcher: notify::RecommendedWatcher,
) {
    let mut poll = opts.poll_interval.map(|p| {
        let mut i = tokio::time::interval(p);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let mut last_failed: Option<String> = None;
    // When to reload after notifications: `debounce` after the last one, at most 10× later than
    // the first, so a file rewritten continuously still gets reloaded.
    let mut due: Option<(tokio::time::Instant, tokio::time::Instant)> = None;
    tracing::info!(dir = %dir.display(), version = handle.current().version(), "watching rules");
    loop {
        let sleep_until = due.map(|(at, cap)| at.min(cap));
        let force = tokio::select! {
            _ = cancel.cancelled() => return,
            Some(()) = rx.recv() => {
                let now = tokio::time::Instant::now();
                let cap = due.map_or(now + opts.debounce * 10, |(_, cap)| cap);
                due = Some((now + opts.debounce, cap));
                continue;
            }
            _ = sleep_until_opt(sleep_until) => false,
            _ = next_hangup(&mut sighup) => {
                tracing::info!("SIGHUP: reloading rules");
                true
            }
            _ = tick_opt(&mut poll) => {
                let d = dir.clone();
                let v = tokio::task::spawn_blocking(move || dir_version(&d)).await;
                match v {
                    Ok(Ok(v)) if v != handle.current().version() && last_failed.as_deref() != Some(&v) => false,
                    _ => continue,
                }
            }
        };
        due = None;
        let (d, h) = (dir.clone(), handle.clone());
        let old = handle.current().version().to_owned();
        match tokio::task::spawn_blocking(move || h.reload(&d, force)).await {
            Ok(Ok(true)) => {
                last_failed = None;
                let cur = handle.current();
                tracing::info!(old = %old, version = cur.version(), rules = cur.len(), "rules reloaded");
            }
            Ok(Ok(false)) => {
                last_failed = None;
            }
            Ok(Err(e)) => {
                last_failed = dir_version(&dir).ok();
                if e.diagnostics().is_empty() {
                    tracing::error!(error = %e, keeping = %old, "rules reload failed; keeping previous rules");
                }
                for d in e.diagnostics() {
                    tracing::error!(
                        file = %d.file,
                        line = d.line,
                        column = d.column,
                        keeping = %old,
                        "invalid rules, keeping previous rules: {d}"
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "rules reload task failed"),
        }
    }
}
