//! Keeping the pool's workers off the core of the thread that hands them a job.
//!
//! A step wakes two threads at once: its own (the span's worker thread, woken by the
//! network task) and the pool's workers. When every core is busy at that instant, Linux
//! may queue a woken worker on the caller's core and leave it there while the other core
//! goes idle: the product then runs on one core at half speed. On a 2-core machine
//! running a 3-node mesh in one process, a scheduler trace showed one core computing
//! while the other sat idle 36 % of the time (docs/performance.md). Telling the workers,
//! whenever the caller is on a new core, that they may run anywhere but there keeps them
//! from queueing behind it; a caller that stays put costs one `sched_getcpu` (a vDSO read)
//! per product.

/// The CPUs a pool's workers may use, narrowed to leave the caller's core to the caller.
pub(super) struct Spread {
    #[cfg(target_os = "linux")]
    linux: linux::Spread,
}

impl Spread {
    /// For a pool of `workers` worker threads (besides the caller's).
    pub(super) fn new(workers: usize) -> Self {
        #[cfg(not(target_os = "linux"))]
        let _ = workers;
        Self {
            #[cfg(target_os = "linux")]
            linux: linux::Spread::new(workers),
        }
    }

    /// Called by each worker thread as it starts, so it can be told where to run.
    pub(super) fn register_this_worker(&self) {
        #[cfg(target_os = "linux")]
        self.linux.register_this_worker();
    }

    /// Called by the thread about to hand out a job (one at a time: the pool's busy lock).
    pub(super) fn keep_off_callers_core(&self) {
        #[cfg(target_os = "linux")]
        self.linux.keep_off_callers_core();
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::sync::atomic::{AtomicI32, Ordering};
    use std::sync::Mutex;

    pub(super) struct Spread {
        /// The CPUs this process may run on, as it started the pool.
        allowed: Vec<usize>,
        workers: usize,
        /// Thread ids of the workers that have started.
        tids: Mutex<Vec<libc::pid_t>>,
        /// The core the workers were last told to avoid, or -1.
        avoided: AtomicI32,
    }

    impl Spread {
        pub(super) fn new(workers: usize) -> Self {
            Self {
                allowed: allowed_cpus(),
                workers,
                tids: Mutex::new(Vec::with_capacity(workers)),
                avoided: AtomicI32::new(-1),
            }
        }

        /// A worker that starts after the workers were told to avoid a core avoids it too.
        pub(super) fn register_this_worker(&self) {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            if let Ok(mut tids) = self.tids.lock() {
                tids.push(tid);
                let avoided = self.avoided.load(Ordering::Relaxed);
                if avoided >= 0 {
                    self.set_all_but(avoided, &[tid]);
                }
            }
        }

        pub(super) fn keep_off_callers_core(&self) {
            // SAFETY: sched_getcpu has no preconditions; it returns -1 on failure.
            let cpu = unsafe { libc::sched_getcpu() };
            if cpu < 0 || self.avoided.load(Ordering::Relaxed) == cpu {
                return;
            }
            // Under the lock, so a worker registering meanwhile reads the new core.
            if let Ok(tids) = self.tids.lock() {
                self.set_all_but(cpu, &tids);
                self.avoided.store(cpu, Ordering::Relaxed);
            }
        }

        /// Let threads `tids` run on every allowed CPU but `cpu`: only where the workers
        /// fit on the other cores, since with more threads than cores, shutting them out
        /// of one would crowd them onto fewer still.
        fn set_all_but(&self, cpu: i32, tids: &[libc::pid_t]) {
            if self.workers == 0 || self.workers >= self.allowed.len() {
                return;
            }
            let Some(set) = cpu_set(self.allowed.iter().filter(|&&c| c as i32 != cpu)) else {
                return;
            };
            for &tid in tids {
                // SAFETY: `set` is a valid, initialised cpu_set_t of the size passed. A
                // failure (a worker gone, a cpuset that changed) leaves it where it was.
                unsafe {
                    libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
                }
            }
        }
    }

    #[cfg(test)]
    impl Spread {
        pub(in super::super) fn worker_tids(&self) -> Vec<libc::pid_t> {
            self.tids.lock().map(|t| t.clone()).unwrap_or_default()
        }
    }

    /// The CPUs the calling thread may run on (empty if that cannot be read).
    pub(super) fn allowed_cpus() -> Vec<usize> {
        affinity_of(0).unwrap_or_default()
    }

    /// The CPUs thread `tid` (0: the calling thread) may run on.
    pub(super) fn affinity_of(tid: libc::pid_t) -> Option<Vec<usize>> {
        // SAFETY: an all-zero cpu_set_t is a valid empty set; sched_getaffinity writes at
        // most the size passed.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let got = unsafe {
            libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set)
        };
        (got == 0).then(|| {
            (0..libc::CPU_SETSIZE as usize)
                // SAFETY: `c` is below CPU_SETSIZE, inside the set.
                .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
                .collect()
        })
    }

    /// A cpu_set_t holding `cpus`; `None` if it would be empty or a CPU is out of range.
    pub(super) fn cpu_set<'a>(cpus: impl Iterator<Item = &'a usize>) -> Option<libc::cpu_set_t> {
        // SAFETY: an all-zero cpu_set_t is a valid empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let mut any = false;
        for &c in cpus {
            if c >= libc::CPU_SETSIZE as usize {
                return None;
            }
            // SAFETY: `c` is below CPU_SETSIZE, inside the set.
            unsafe { libc::CPU_SET(c, &mut set) };
            any = true;
        }
        any.then_some(set)
    }
}

#[cfg(all(test, target_os = "linux"))]
impl Spread {
    pub(super) fn worker_tids(&self) -> Vec<libc::pid_t> {
        self.linux.worker_tids()
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::super::pool::WorkerPool;
    use super::linux::{affinity_of, allowed_cpus, cpu_set};

    /// Pins the calling thread to `cpu`; returns what it was allowed before.
    fn pin_this_thread(cpu: usize) -> Vec<usize> {
        let before = allowed_cpus();
        let set = cpu_set([cpu].iter()).expect("a CPU in range");
        // SAFETY: `set` is a valid cpu_set_t of the size passed.
        let got =
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        assert_eq!(got, 0);
        before
    }

    /// A job handed out from one core leaves every worker allowed everywhere but there,
    /// and handed out from another core, the workers follow.
    #[test]
    fn workers_keep_off_the_core_of_the_thread_that_hands_out_the_job() {
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty(), "this thread's CPUs can be read");
        if allowed.len() < 2 {
            eprintln!("one CPU: nothing to spread over");
            return;
        }
        let pool = WorkerPool::new(2);
        let run = |pool: &WorkerPool| {
            let sum = std::sync::atomic::AtomicUsize::new(0);
            assert!(pool.run(64, &|i| {
                sum.fetch_add(i, std::sync::atomic::Ordering::Relaxed);
            }));
            assert_eq!(sum.into_inner(), 64 * 63 / 2);
        };
        let tids = || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                let tids = pool.spread_for_tests().worker_tids();
                if tids.len() == 1 || std::time::Instant::now() > deadline {
                    return tids;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        let tids = tids();
        assert_eq!(tids.len(), 1, "the worker registered");
        std::thread::scope(|s| {
            s.spawn(|| {
                for &cpu in &allowed[..2] {
                    pin_this_thread(cpu);
                    run(&pool);
                    let want: Vec<usize> = allowed.iter().copied().filter(|&c| c != cpu).collect();
                    assert_eq!(
                        affinity_of(tids[0]),
                        Some(want),
                        "handed out from CPU {cpu}"
                    );
                }
            });
        });
    }

    /// With as many workers as cores, none is shut out of any: they would only crowd.
    #[test]
    fn a_pool_as_wide_as_the_machine_is_left_alone() {
        let allowed = allowed_cpus();
        let pool = WorkerPool::new(allowed.len() + 1);
        let sum = std::sync::atomic::AtomicUsize::new(0);
        assert!(pool.run(64, &|i| {
            sum.fetch_add(i, std::sync::atomic::Ordering::Relaxed);
        }));
        for tid in pool.spread_for_tests().worker_tids() {
            assert_eq!(affinity_of(tid), Some(allowed.clone()));
        }
    }
}
