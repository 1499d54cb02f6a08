//! A userspace Ethernet delay line between two TAP devices.
//!
//! Why it exists: this kernel has no `sch_netem` (and no `fq`/`etf` for timestamp-based
//! pacing), so nothing in the kernel can hold a packet back for a fixed time. Frames
//! read from one TAP are written to the other `one_way` later, in order, both ways. The
//! two TAPs are bridged on either side of a link (see `Lab::delay`), so every frame on
//! that link crosses this relay.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `TUNSETIFF` from `<linux/if_tun.h>`.
const TUNSETIFF: u64 = 0x4004_54ca;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const POLLIN: i16 = 0x0001;
/// How often a blocked reader looks at the stop flag.
const POLL_MS: i32 = 50;
/// Frames in flight per direction; more are dropped, as a full device queue would.
const IN_FLIGHT: usize = 4096;
/// Largest frame read (MTU 1500 plus headers, with room to spare).
const MAX_FRAME: usize = 65_536;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

extern "C" {
    fn ioctl(fd: i32, request: u64, ...) -> i32;
    fn poll(fds: *mut PollFd, nfds: u64, timeout: i32) -> i32;
}

/// Opens `/dev/net/tun` as the TAP device `name` in this process's network namespace.
/// The device lives as long as the returned file.
fn open_tap(name: &str) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    let bytes = name.as_bytes();
    if bytes.len() >= req.name.len() {
        return Err(io::Error::other(format!("tap name {name} is too long")));
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `IfReq` lays out.
    let rc = unsafe { ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Waits up to [`POLL_MS`] for `file` to be readable.
fn readable(file: &File) -> io::Result<bool> {
    let mut fd = PollFd {
        fd: file.as_raw_fd(),
        events: POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let rc = unsafe { poll(&mut fd, 1, POLL_MS) };
    match rc {
        n if n < 0 => {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(err)
            }
        }
        0 => Ok(false),
        _ => Ok(fd.revents & POLLIN != 0),
    }
}

/// A running delay line; dropping it stops the relay and removes both TAP devices.
pub struct DelayLine {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DelayLine {
    /// Creates TAP devices `a` and `b` in this process's namespace (move them elsewhere
    /// with `ip link set NAME netns NS`: the relay keeps working) and relays frames
    /// between them, `one_way` late in each direction.
    pub fn open(a: &str, b: &str, one_way: Duration) -> io::Result<DelayLine> {
        let (tap_a, tap_b) = (open_tap(a)?, open_tap(b)?);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (from, to) in [(tap_a.try_clone()?, tap_b.try_clone()?), (tap_b, tap_a)] {
            let (tx, rx) = sync_channel(IN_FLIGHT);
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                read_frames(from, tx, one_way, &stop)
            }));
            threads.push(std::thread::spawn(move || write_frames(to, rx)));
        }
        Ok(DelayLine { stop, threads })
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Reads frames and stamps each with the time it may leave.
fn read_frames(
    mut from: File,
    tx: SyncSender<(Instant, Vec<u8>)>,
    one_way: Duration,
    stop: &AtomicBool,
) {
    let mut buf = vec![0u8; MAX_FRAME];
    while !stop.load(Ordering::SeqCst) {
        match readable(&from) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(_) => return,
        }
        let n = match from.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        match tx.try_send((Instant::now() + one_way, buf[..n].to_vec())) {
            Ok(()) | Err(TrySendError::Full(_)) => {}
            Err(TrySendError::Disconnected(_)) => return,
        }
    }
}

/// Writes frames out in arrival order, each no earlier than its stamp. The delay is the
/// same for every frame, so the stamps are already in order.
fn write_frames(mut to: File, rx: Receiver<(Instant, Vec<u8>)>) {
    loop {
        let (due, frame) = match rx.recv_timeout(Duration::from_millis(POLL_MS as u64)) {
            Ok(item) => item,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        // A frame the peer device cannot take (it is down, say) is lost, as on a wire.
        let _ = to.write(&frame);
    }
}
