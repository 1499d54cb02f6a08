//! One persistent pool of worker threads for the decode path's matrix-vector products.
//!
//! A decode step runs dozens of small products back to back (q/k/v, o, gate/up, down per
//! block, then the LM head). A fork-join per product (rayon, candle's gemm) pays a wake-up
//! and a sleep each time; here the workers spin between products, so a step's products
//! reach them in a few hundred nanoseconds, and they park once the step is over.
//!
//! A caller marks a step with [`WorkerPool::hold`]: while a hold is alive the workers spin
//! through the gaps between its products; once the last hold drops they park after
//! [`GRACE`]. Spinning past the end of a step burns a core that, on a machine whose cores
//! the process shares with its network tasks or with other nodes, the next hop needs.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::spread::Spread;

/// How long an idle worker spins for the next product when no step holds the pool: longer
/// than the gap between two products, far shorter than a step.
const GRACE: Duration = Duration::from_micros(20);

/// How long an idle worker spins while a step holds the pool: longer than any gap between
/// two products of one step (norms, rope, cache writes), short enough that a hold kept by
/// mistake across a network wait costs little.
const SPIN_HELD: Duration = Duration::from_millis(2);

/// How long workers spin after [`WorkerPool::expect_work`]: the hand-off of a request to
/// the thread that runs it and its decoding, with room to spare.
const SPIN_EXPECTED: Duration = Duration::from_micros(500);

/// Threads of the process-wide pool: `MESH_CPU_THREADS`, else every core.
pub fn threads_from_env() -> usize {
    std::env::var("MESH_CPU_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

/// The process-wide pool (created on first use). One pool per process, not per span: the
/// spans and the head of one process take turns, and a pool per span would leave idle
/// workers spinning on cores another span needs.
pub fn global() -> &'static WorkerPool {
    static POOL: OnceLock<WorkerPool> = OnceLock::new();
    POOL.get_or_init(|| WorkerPool::new(threads_from_env()))
}

/// One product handed to the workers: tasks `0..tasks`, claimed one at a time.
struct Job<'a> {
    task: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
}

impl<'a> Job<'a> {
    fn new(task: &'a (dyn Fn(usize) + Sync), tasks: usize) -> Self {
        Self {
            task,
            tasks,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        }
    }

    /// Claim and run tasks until none are left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.tasks {
                return;
            }
            if catch_unwind(AssertUnwindSafe(|| (self.task)(i))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

struct Shared {
    /// The job being run, or null. Workers read it only between `entered` going up and
    /// down, and the caller clears it and waits for `entered == 0` before its job (on the
    /// caller's stack) goes away.
    job: AtomicPtr<Job<'static>>,
    /// Bumped once per job: how a spinning or parked worker learns there is work.
    epoch: AtomicU64,
    entered: AtomicUsize,
    sleeping: AtomicUsize,
    /// Times a worker has gone to sleep.
    parks: AtomicU64,
    /// Bumped by each [`WorkerPool::expect_work`], so that a worker parked then wakes
    /// even if it is scheduled only after the expectation ran out.
    expectations: AtomicU64,
    /// Live [`Hold`]s: steps under way whose next product is coming.
    held: AtomicUsize,
    /// Until when (nanoseconds past `origin`) a step is known to be on its way: see
    /// [`WorkerPool::expect_work`].
    expected_until: AtomicU64,
    origin: Instant,
    shutdown: AtomicBool,
    spread: Spread,
    park: Mutex<()>,
    wake: Condvar,
}

impl Shared {
    /// Whether [`WorkerPool::expect_work`] said a step is coming, and not too long ago.
    fn expecting(&self) -> bool {
        (self.origin.elapsed().as_nanos() as u64) < self.expected_until.load(Ordering::SeqCst)
    }
}

/// Worker threads that run the tasks of one job at a time, with the caller's thread.
pub struct WorkerPool {
    shared: Arc<Shared>,
    /// Held by the one caller whose job the workers run; others run theirs inline.
    busy: Mutex<()>,
    workers: Vec<JoinHandle<()>>,
}

thread_local! {
    /// Set on the pool's own threads, so a task that itself multiplies runs it inline.
    static IN_WORKER: Cell<bool> = const { Cell::new(false) };
}

impl WorkerPool {
    /// A pool of `threads` threads in all: the caller's and `threads - 1` workers.
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicU64::new(0),
            entered: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            parks: AtomicU64::new(0),
            expectations: AtomicU64::new(0),
            held: AtomicUsize::new(0),
            expected_until: AtomicU64::new(0),
            origin: Instant::now(),
            shutdown: AtomicBool::new(false),
            spread: Spread::new(threads.max(1) - 1),
            park: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..threads.max(1))
            .filter_map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("mesh-matvec-{i}"))
                    .spawn(move || worker(&shared))
                    .ok()
            })
            .collect();
        Self {
            shared,
            busy: Mutex::new(()),
            workers,
        }
    }

    /// Threads that run a job: the workers and the caller.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Keep the workers spinning between products until the returned guard drops: a
    /// step's whole run of products, so a worker neither parks in a gap nor spins on
    /// after the step.
    pub fn hold(&self) -> Hold<'_> {
        self.shared.held.fetch_add(1, Ordering::SeqCst);
        // The step that was expected has come: past it, the workers park as usual.
        self.shared.expected_until.store(0, Ordering::SeqCst);
        Hold { pool: self }
    }

    /// A step is on its way (a request has just arrived for it): wake parked workers now
    /// and keep them spinning until a step holds the pool, for up to [`SPIN_EXPECTED`],
    /// so the step's first products find them awake instead of paying a wake-up. While a
    /// step holds the pool it does nothing: the next step follows that one, and spinning
    /// on after each would take cores a busy server's peers and clients need (16 clients
    /// of one in-process server lost 10-15 % of their tokens to it).
    pub fn expect_work(&self) {
        let shared = &*self.shared;
        if shared.held.load(Ordering::SeqCst) > 0 {
            return;
        }
        let until = shared.origin.elapsed() + SPIN_EXPECTED;
        shared
            .expected_until
            .fetch_max(until.as_nanos() as u64, Ordering::SeqCst);
        shared.expectations.fetch_add(1, Ordering::SeqCst);
        if shared.sleeping.load(Ordering::SeqCst) > 0 {
            let _lock = shared.park.lock();
            shared.wake.notify_all();
        }
    }

    /// Run `task(0) .. task(tasks - 1)` on the caller's thread alone, the workers left
    /// where they are: for a job too small to be worth a hand-off ([`super::worth_sharing`]).
    /// Returns `false` if a task panicked, as [`Self::run`] does.
    pub fn run_here(&self, tasks: usize, task: &(dyn Fn(usize) + Sync)) -> bool {
        let job = Job::new(task, tasks);
        job.work();
        !job.panicked.load(Ordering::Relaxed)
    }

    /// Run `task(0) .. task(tasks - 1)` across the pool and return when all have run.
    /// Returns `false` if a task panicked (its product is then incomplete).
    pub fn run(&self, tasks: usize, task: &(dyn Fn(usize) + Sync)) -> bool {
        let job = Job::new(task, tasks);
        // One task, no workers, a nested call, or another thread's job in flight: inline.
        let guard = match self.busy.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        if tasks <= 1 || self.workers.is_empty() || guard.is_none() || IN_WORKER.get() {
            job.work();
            return !job.panicked.load(Ordering::Relaxed);
        }
        let shared = &*self.shared;
        shared.spread.keep_off_callers_core();
        // SAFETY: the pointer is published only until this function clears it and has
        // seen every worker that could have read it leave (`entered == 0`), so no worker
        // touches `job` after it goes out of scope; the lifetime is erased for the store.
        let ptr = std::ptr::from_ref(&job).cast::<Job<'static>>().cast_mut();
        shared.job.store(ptr, Ordering::SeqCst);
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        if shared.sleeping.load(Ordering::SeqCst) > 0 {
            let _lock = shared.park.lock();
            shared.wake.notify_all();
        }
        job.work();
        // A worker the OS took off its core mid-task holds the job up: after a short
        // spin, give the core away so it can finish.
        wait_until(|| job.done.load(Ordering::Acquire) >= tasks);
        shared.job.store(std::ptr::null_mut(), Ordering::SeqCst);
        wait_until(|| shared.entered.load(Ordering::SeqCst) == 0);
        drop(guard);
        !job.panicked.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
impl WorkerPool {
    pub(super) fn spread_for_tests(&self) -> &Spread {
        &self.shared.spread
    }
}

/// A step under way; see [`WorkerPool::hold`].
#[must_use = "the workers park as soon as the hold drops"]
pub struct Hold<'a> {
    pool: &'a WorkerPool,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.pool.shared.held.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _lock = self.shared.park.lock();
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(shared: &Shared) {
    IN_WORKER.set(true);
    shared.spread.register_this_worker();
    let mut seen = shared.epoch.load(Ordering::SeqCst);
    loop {
        // Spin for the next job while a step holds the pool (or briefly), then park
        // until one is published.
        let idle_since = Instant::now();
        let mut spins = 0u32;
        let mut seen_expectations = shared.expectations.load(Ordering::SeqCst);
        while shared.epoch.load(Ordering::SeqCst) == seen {
            if shared.shutdown.load(Ordering::Relaxed) {
                return;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) {
                let limit = if shared.held.load(Ordering::Relaxed) > 0 {
                    SPIN_HELD
                } else {
                    GRACE
                };
                if idle_since.elapsed() >= limit && !shared.expecting() {
                    park(shared, seen, seen_expectations);
                    seen_expectations = shared.expectations.load(Ordering::SeqCst);
                }
            }
        }
        if shared.shutdown.load(Ordering::Relaxed) {
            return;
        }
        seen = shared.epoch.load(Ordering::SeqCst);
        shared.entered.fetch_add(1, Ordering::SeqCst);
        let ptr = shared.job.load(Ordering::SeqCst);
        // SAFETY: non-null means the caller has not yet cleared it, and it will not return
        // (freeing the job) until `entered` drops back, below.
        if let Some(job) = unsafe { ptr.as_ref() } {
            job.work();
        }
        shared.entered.fetch_sub(1, Ordering::SeqCst);
    }
}

fn wait_until(done: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !done() {
        if spins < 2048 {
            spins += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// Sleep until the epoch moves past `seen`, an expectation is announced past
/// `seen_expectations` ([`WorkerPool::expect_work`]), or the pool shuts down.
fn park(shared: &Shared, seen: u64, seen_expectations: u64) {
    let Ok(mut lock) = shared.park.lock() else {
        return;
    };
    shared.sleeping.fetch_add(1, Ordering::SeqCst);
    let mut counted = false;
    while shared.epoch.load(Ordering::SeqCst) == seen
        && shared.expectations.load(Ordering::SeqCst) == seen_expectations
        && !shared.shutdown.load(Ordering::SeqCst)
    {
        if !counted {
            shared.parks.fetch_add(1, Ordering::SeqCst);
            counted = true;
        }
        lock = match shared.wake.wait(lock) {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
    }
    shared.sleeping.fetch_sub(1, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job too small to share runs wholly on its caller, and a panic in it is reported.
    #[test]
    fn run_here_runs_every_task_on_the_callers_thread() {
        let pool = WorkerPool::new(3);
        let caller = std::thread::current().id();
        let seen = Mutex::new(Vec::new());
        assert!(pool.run_here(16, &|t| {
            if let Ok(mut s) = seen.lock() {
                s.push((t, std::thread::current().id()));
            }
        }));
        let seen = seen.into_inner().unwrap_or_default();
        let want: Vec<_> = (0..16).map(|t| (t, caller)).collect();
        assert_eq!(seen, want);
        assert!(!pool.run_here(2, &|t| assert_ne!(t, 1, "a task that panics")));
    }

    #[test]
    fn every_task_runs_once_across_many_jobs() {
        let pool = WorkerPool::new(3);
        for tasks in [0usize, 1, 2, 7, 64] {
            for _ in 0..200 {
                let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                assert!(pool.run(tasks, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                }));
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn parked_workers_wake_for_the_next_job() {
        let pool = WorkerPool::new(2);
        let count = AtomicUsize::new(0);
        std::thread::sleep(SPIN_HELD * 2);
        assert!(pool.run(16, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        }));
        assert_eq!(count.load(Ordering::Relaxed), 16);
    }

    /// Waits (up to a second) for `done` to hold.
    fn within_a_second(done: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        false
    }

    #[test]
    fn expected_work_wakes_parked_workers_for_a_while_only() {
        let pool = WorkerPool::new(3);
        let shared = &*pool.shared;
        assert!(
            within_a_second(|| shared.sleeping.load(Ordering::SeqCst) == 2),
            "idle workers park"
        );
        let parked = shared.parks.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            shared.parks.load(Ordering::SeqCst),
            parked,
            "and stay parked"
        );
        pool.expect_work();
        assert!(
            within_a_second(|| shared.parks.load(Ordering::SeqCst) == parked + 2),
            "told a step is coming, they wake; none came, so they park again"
        );
        let count = AtomicUsize::new(0);
        assert!(pool.run(16, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        }));
        assert_eq!(count.load(Ordering::Relaxed), 16);
    }

    #[test]
    fn the_expected_step_ends_the_expectation() {
        let pool = WorkerPool::new(2);
        pool.expect_work();
        assert!(pool.shared.expecting());
        drop(pool.hold());
        assert!(
            !pool.shared.expecting(),
            "past the step, the workers park after the usual grace"
        );
        let hold = pool.hold();
        pool.expect_work();
        assert!(
            !pool.shared.expecting(),
            "while a step holds the pool, the next is not waited for"
        );
        drop(hold);
    }

    #[test]
    fn concurrent_callers_and_panics_are_reported_not_hung() {
        let pool = Arc::new(WorkerPool::new(2));
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || {
                    let sum = AtomicUsize::new(0);
                    for _ in 0..100 {
                        pool.run(8, &|i| {
                            sum.fetch_add(i, Ordering::Relaxed);
                        });
                    }
                    sum.load(Ordering::Relaxed)
                })
            })
            .collect();
        for c in callers {
            assert_eq!(c.join().ok(), Some(100 * 28));
        }
        let ok = pool.run(4, &|i| {
            if i == 2 {
                panic!("task 2 fails");
            }
        });
        assert!(!ok);
    }
}
