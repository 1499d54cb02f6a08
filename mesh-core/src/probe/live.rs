//! Live GPU figures: memory used, free and total and utilisation, read from `nvidia-smi`
//! under a hard time limit, and [`GpuReadings`], the latest reading that the heartbeat and
//! the HTTP port share (handlers read it; only a sampler waits on the driver). Beside
//! them, the CPU's: the load averages and the CPU time this process used, read from
//! `/proc` (no driver to wait on, so read when asked).
//!
//! ```
//! // No nvidia-smi (or no GPU) is an empty list, never an error.
//! let now = mesh_core::probe::gpu_live();
//! assert!(now.iter().all(|g| g.is_valid()));
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::types::{Capability, GpuLive};

/// The longest a live reading may take: `nvidia-smi` answers well inside it, a hung driver
/// never, and a heartbeat must not wait on one.
pub const GPU_LIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Readings closer together than this reuse the last one, so several nodes in one process
/// or short test heartbeat intervals do not run `nvidia-smi` back to back.
pub const MIN_GPU_SAMPLE: Duration = Duration::from_secs(1);

const QUERY: &str = "--query-gpu=index,memory.used,memory.free,memory.total,utilization.gpu";

/// This machine's GPUs now, at most [`Capability::MAX_GPUS`], each valid
/// ([`GpuLive::is_valid`]). Blocks for up to [`GPU_LIVE_TIMEOUT`]: call it off the async
/// runtime (as [`GpuReadings::refresh`] does). No `nvidia-smi`, no GPU, a timeout or
/// unreadable output: an empty list.
pub fn gpu_live() -> Vec<GpuLive> {
    super::run_bounded(
        "nvidia-smi",
        &[QUERY, "--format=csv,noheader,nounits"],
        GPU_LIVE_TIMEOUT,
    )
    .map(|csv| parse_gpu_live(&csv))
    .unwrap_or_default()
}

/// Parses `index, memory.used, memory.free, memory.total, utilization.gpu` lines (MiB and
/// percent, no units). A line without a readable index, used or total, or with impossible
/// figures, is skipped; an unreadable free is total − used; an unreadable utilisation
/// (`[N/A]`, `[Not Supported]`, over 100) is `None`.
fn parse_gpu_live(csv: &str) -> Vec<GpuLive> {
    let mib = |s: &str| s.parse::<u64>().ok()?.checked_mul(1 << 20);
    csv.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            let [index, used, free, total, util] = f.as_slice() else {
                return None;
            };
            let (used, total) = (mib(used)?, mib(total)?);
            let g = GpuLive {
                index: index.parse().ok()?,
                memory_used_bytes: used,
                memory_free_bytes: mib(free).unwrap_or(total.saturating_sub(used)),
                memory_total_bytes: total,
                utilization_percent: util.parse::<u8>().ok().filter(|u| *u <= 100),
            };
            g.is_valid().then_some(g)
        })
        .take(Capability::MAX_GPUS)
        .collect()
}

/// The machine's load averages over 1, 5 and 15 minutes (runnable tasks, as `uptime`
/// shows them); `None` where `/proc/loadavg` is not readable.
pub fn load_average() -> Option<[f64; 3]> {
    parse_loadavg(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut it = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    let (a, b, c) = (it.next()??, it.next()??, it.next()??);
    [a, b, c]
        .iter()
        .all(|v| v.is_finite() && *v >= 0.0)
        .then_some([a, b, c])
}

/// CPU seconds this process has used so far, user and system together; `None` where
/// `/proc/self/stat` is not readable. Two readings over a wall interval give the share of
/// a core it used.
pub fn process_cpu_seconds() -> Option<f64> {
    let ticks = parse_stat_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    #[cfg(unix)]
    // SAFETY: sysconf reads a constant of the running system.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    #[cfg(not(unix))]
    let per_sec = 100;
    (per_sec > 0).then(|| ticks as f64 / per_sec as f64)
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line. The command name (field
/// 2) may hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so field n is at index n - 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    utime.checked_add(stime)
}

type Reader = Arc<dyn Fn() -> Vec<GpuLive> + Send + Sync>;

#[derive(Default)]
struct Latest {
    gpus: Vec<GpuLive>,
    at: Option<Instant>,
}

/// The latest live GPU reading, cheap to clone and to read. A sampler calls
/// [`Self::refresh`] on its timer; readers call [`Self::latest`] and never wait on the
/// driver. The reader function is a field so tests supply readings without a GPU.
#[derive(Clone)]
pub struct GpuReadings {
    reader: Reader,
    latest: Arc<Mutex<Latest>>,
}

impl Default for GpuReadings {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for GpuReadings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuReadings")
            .field("latest", &self.latest())
            .finish_non_exhaustive()
    }
}

impl GpuReadings {
    /// Readings of this machine's GPUs ([`gpu_live`]); empty until the first refresh.
    pub fn new() -> Self {
        Self::with_reader(gpu_live)
    }

    /// Readings from `read` instead of `nvidia-smi` (tests, other drivers). `read` may
    /// block; it runs on a blocking thread.
    pub fn with_reader(read: impl Fn() -> Vec<GpuLive> + Send + Sync + 'static) -> Self {
        Self {
            reader: Arc::new(read),
            latest: Arc::new(Mutex::new(Latest::default())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Latest> {
        // A panic elsewhere leaves a whole reading behind: keep serving it.
        self.latest.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The latest reading; empty before the first, or on a machine without GPUs.
    pub fn latest(&self) -> Vec<GpuLive> {
        self.lock().gpus.clone()
    }

    /// Replaces the reading, keeping its first [`Capability::MAX_GPUS`] valid entries.
    pub fn set(&self, gpus: Vec<GpuLive>) {
        let gpus = gpus
            .into_iter()
            .filter(GpuLive::is_valid)
            .take(Capability::MAX_GPUS)
            .collect();
        *self.lock() = Latest {
            gpus,
            at: Some(Instant::now()),
        };
    }

    /// Reads the GPUs again on a blocking thread (unless the last reading is under
    /// [`MIN_GPU_SAMPLE`] old) and returns the latest reading.
    pub async fn refresh(&self) -> Vec<GpuLive> {
        if self
            .lock()
            .at
            .is_some_and(|at| at.elapsed() < MIN_GPU_SAMPLE)
        {
            return self.latest();
        }
        let read = self.reader.clone();
        match tokio::task::spawn_blocking(move || read()).await {
            Ok(gpus) => self.set(gpus),
            Err(e) => tracing::debug!("GPU reading failed: {e}"),
        }
        self.latest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn parses_live_readings() {
        let csv = "0, 2048, 22528, 24576, 37\n1, 81000, 559, 81559, 100\n";
        let gpus = parse_gpu_live(csv);
        assert_eq!(
            gpus,
            vec![
                GpuLive {
                    index: 0,
                    memory_used_bytes: 2 * GIB,
                    memory_free_bytes: 22 * GIB,
                    memory_total_bytes: 24 * GIB,
                    utilization_percent: Some(37),
                },
                GpuLive {
                    index: 1,
                    memory_used_bytes: 81000 << 20,
                    memory_free_bytes: 559 << 20,
                    memory_total_bytes: 81559 << 20,
                    utilization_percent: Some(100),
                },
            ]
        );
        // Windows line ends and no final newline read the same.
        assert_eq!(parse_gpu_live(&csv.replace('\n', "\r\n")), gpus);
        assert_eq!(parse_gpu_live(csv.trim_end()), gpus);
    }

    #[test]
    fn not_available_fields_and_malformed_lines() {
        let csv = "\
0, 1024, [N/A], 8192, [N/A]
1, 1024, 7168, 8192, [Not Supported]
2, 1024, 7168, 8192, 101
3, [N/A], 7168, 8192, 5
4, 1024, 7168, [N/A], 5
x, 1024, 7168, 8192, 5
5, 9000, 0, 8192, 5
6, 1024, 9000, 8192, 5
7, 1024, 7168, 8192
8, 1024, 7168, 8192, 5, 6
9, -1, 7168, 8192, 5
garbage

10, 18446744073709551615, 0, 18446744073709551615, 5
11, 0, 8192, 8192, 0
";
        let gpus = parse_gpu_live(csv);
        let indices: Vec<u32> = gpus.iter().map(|g| g.index).collect();
        assert_eq!(indices, vec![0, 1, 2, 11]);
        // Free unknown: total − used; utilisation unknown or impossible: None.
        assert_eq!(gpus[0].memory_free_bytes, 7 << 30);
        assert_eq!(gpus[0].utilization_percent, None);
        assert_eq!(gpus[1].utilization_percent, None);
        assert_eq!(gpus[2].utilization_percent, None);
        assert_eq!(gpus[3].utilization_percent, Some(0));
        assert!(gpus.iter().all(GpuLive::is_valid));
    }

    #[test]
    fn no_gpu_is_an_empty_list() {
        assert!(parse_gpu_live("").is_empty());
        assert!(parse_gpu_live("\n\n").is_empty());
        assert!(parse_gpu_live("No devices were found\n").is_empty());
        // Without nvidia-smi (this machine, CI), or with it: never an error, always valid.
        let here = gpu_live();
        assert!(GpuLive::list_is_valid(&here));
    }

    #[test]
    fn at_most_max_gpus_are_read() {
        let csv: String = (0..40).map(|i| format!("{i}, 1, 2, 3, 4\n")).collect();
        assert_eq!(parse_gpu_live(&csv).len(), Capability::MAX_GPUS);
    }

    #[tokio::test]
    async fn readings_come_from_the_reader_and_are_bounded() {
        let one = GpuLive {
            index: 0,
            memory_used_bytes: GIB,
            memory_free_bytes: 7 * GIB,
            memory_total_bytes: 8 * GIB,
            utilization_percent: Some(50),
        };
        let r = GpuReadings::with_reader(move || vec![one; 3]);
        assert!(r.latest().is_empty());
        assert_eq!(r.refresh().await, vec![one; 3]);
        assert_eq!(r.clone().latest().len(), 3);

        let bad = GpuLive {
            utilization_percent: Some(101),
            ..one
        };
        r.set(vec![bad, one, bad]);
        assert_eq!(r.latest(), vec![one]);
        r.set(vec![one; 40]);
        assert_eq!(r.latest().len(), Capability::MAX_GPUS);
        // A fresh reading is reused rather than read again at once.
        r.set(Vec::new());
        assert!(r.refresh().await.is_empty());

        let none = GpuReadings::with_reader(Vec::new);
        assert!(none.refresh().await.is_empty());
    }

    #[test]
    fn cpu_figures_parse_from_proc() {
        assert_eq!(
            parse_loadavg("0.52 1.04 2.50 3/812 12345\n"),
            Some([0.52, 1.04, 2.5])
        );
        assert_eq!(parse_loadavg("0.52 nan"), None);
        assert_eq!(parse_loadavg(""), None);
        let stat = "4242 (mesh node (x)) S 1 4242 4242 0 -1 4194560 2000 0 0 0 150 25 0 0 20 0";
        assert_eq!(parse_stat_ticks(stat), Some(175));
        assert_eq!(parse_stat_ticks("4242 (short) S 1"), None);
        // This machine's own: the load is there on Linux, and this process used some CPU.
        if cfg!(target_os = "linux") {
            assert!(load_average().is_some());
            assert!(process_cpu_seconds().is_some_and(|s| s >= 0.0));
        }
    }
}
