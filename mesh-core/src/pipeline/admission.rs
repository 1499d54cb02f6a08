//! Who may queue work on a server, before any of it is decoded: a token bucket of requests
//! per second per peer, and a cap on one peer's requests waiting or running at once.
//!
//! Without a per-peer cap one fast peer could fill the whole queue and every honest client
//! would be told `Busy`. With it, a flooder holds at most
//! [`ServerLimits::in_flight_per_peer`] places and the rest stay for others; and the worker
//! serves what is queued round-robin across peers ([`FairQueue`]), so an honest client's
//! next step waits behind one of the flooder's requests, not all of them.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::protocol::Refusal;
use super::server::ServerLimits;

/// Peers tracked before idle ones are forgotten (connection limits keep the real number
/// of peers far below this).
const MAX_TRACKED_PEERS: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
    in_flight: usize,
}

/// Per-peer admission state of one server.
#[derive(Debug)]
pub struct Admission {
    per_second: f64,
    burst: f64,
    in_flight_cap: usize,
    peers: HashMap<PeerId, Bucket>,
}

impl Admission {
    pub fn new(limits: &ServerLimits) -> Self {
        Self {
            per_second: f64::from(limits.requests_per_second.max(1)),
            burst: f64::from(limits.request_burst.max(1)),
            in_flight_cap: limits.in_flight_per_peer.max(1),
            peers: HashMap::new(),
        }
    }

    /// Admit one request from `peer`, or say why not. An admitted request must be
    /// [`finish`](Self::finish)ed when its answer goes out.
    pub fn admit(&mut self, peer: PeerId, now: Instant) -> Result<(), Refusal> {
        if self.peers.len() >= MAX_TRACKED_PEERS && !self.peers.contains_key(&peer) {
            self.forget_idle(now);
        }
        let bucket = self.peers.entry(peer).or_insert(Bucket {
            tokens: self.burst,
            refilled: now,
            in_flight: 0,
        });
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.refilled = now;
        if bucket.in_flight >= self.in_flight_cap {
            return Err(Refusal::Busy);
        }
        if bucket.tokens < 1.0 {
            let wait = (1.0 - bucket.tokens) / self.per_second;
            return Err(Refusal::RateLimited {
                retry_after_ms: Duration::from_secs_f64(wait).as_millis().max(1) as u64,
            });
        }
        bucket.tokens -= 1.0;
        bucket.in_flight += 1;
        Ok(())
    }

    /// The answer to an admitted request went out (or was dropped).
    pub fn finish(&mut self, peer: &PeerId) {
        if let Some(b) = self.peers.get_mut(peer) {
            b.in_flight = b.in_flight.saturating_sub(1);
        }
    }

    /// Requests of `peer` admitted and not yet answered.
    pub fn in_flight(&self, peer: &PeerId) -> usize {
        self.peers.get(peer).map_or(0, |b| b.in_flight)
    }

    /// Drop peers with nothing in flight whose bucket has refilled: they would start afresh
    /// anyway.
    fn forget_idle(&mut self, now: Instant) {
        let full_after = Duration::from_secs_f64(self.burst / self.per_second);
        self.peers.retain(|_, b| {
            b.in_flight > 0 || now.saturating_duration_since(b.refilled) < full_after
        });
    }
}

/// Work waiting for a server, served one item per peer in turn; holds at most `capacity`.
#[derive(Debug)]
pub struct FairQueue<T> {
    queues: HashMap<PeerId, VecDeque<T>>,
    /// Peers with something queued, in serving order.
    turn: VecDeque<PeerId>,
    len: usize,
    capacity: usize,
}

impl<T> FairQueue<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            queues: HashMap::new(),
            turn: VecDeque::new(),
            len: 0,
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len >= self.capacity
    }

    /// Queue `item` behind `peer`'s earlier ones; `Err(item)` when full.
    pub fn push(&mut self, peer: PeerId, item: T) -> Result<(), T> {
        if self.is_full() {
            return Err(item);
        }
        let queue = self.queues.entry(peer).or_default();
        if queue.is_empty() {
            self.turn.push_back(peer);
        }
        queue.push_back(item);
        self.len += 1;
        Ok(())
    }

    /// The oldest item of the peer whose turn it is.
    pub fn pop(&mut self) -> Option<(PeerId, T)> {
        let peer = self.turn.pop_front()?;
        let queue = self.queues.get_mut(&peer)?;
        let item = queue.pop_front()?;
        self.len -= 1;
        if queue.is_empty() {
            self.queues.remove(&peer);
        } else {
            self.turn.push_back(peer);
        }
        Some((peer, item))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_second: u32, burst: u32, in_flight: usize) -> ServerLimits {
        ServerLimits {
            requests_per_second: per_second,
            request_burst: burst,
            in_flight_per_peer: in_flight,
            ..ServerLimits::default()
        }
    }

    #[test]
    fn a_burst_then_the_rate_then_a_refusal_with_a_retry_time() {
        let mut a = Admission::new(&limits(10, 3, 100));
        let (peer, t0) = (PeerId::random(), Instant::now());
        for _ in 0..3 {
            a.admit(peer, t0).unwrap();
        }
        match a.admit(peer, t0) {
            Err(Refusal::RateLimited { retry_after_ms }) => assert_eq!(retry_after_ms, 100),
            other => panic!("expected rate limit, got {other:?}"),
        }
        // Another peer is not affected.
        a.admit(PeerId::random(), t0).unwrap();
        // 100 ms later one more token has come in.
        a.admit(peer, t0 + Duration::from_millis(100)).unwrap();
        assert!(a.admit(peer, t0 + Duration::from_millis(100)).is_err());
    }

    /// A client's decode steps are requests: a limit meant for floods must not cap an
    /// honest client's tokens per second. One session decoding at 1000 tokens/s (a small
    /// model on a fast GPU, or the tiny one on a CPU), and a gateway peer with 16 sessions
    /// at 250 tokens/s each, are admitted every time for 5 s under the default limits.
    #[test]
    fn default_limits_never_throttle_a_client_decoding_fast() {
        let limits = ServerLimits::default();
        for (sessions, every) in [
            (1, Duration::from_millis(1)),
            (16, Duration::from_millis(4)),
        ] {
            let mut a = Admission::new(&limits);
            let (peer, t0) = (PeerId::random(), Instant::now());
            let steps = Duration::from_secs(5).as_micros() / every.as_micros();
            for step in 0..steps as u32 {
                let now = t0 + every * step;
                for _ in 0..sessions {
                    assert_eq!(
                        a.admit(peer, now),
                        Ok(()),
                        "{sessions} sessions, step {step}"
                    );
                }
                for _ in 0..sessions {
                    a.finish(&peer);
                }
            }
        }
    }

    #[test]
    fn one_peer_cannot_hold_more_than_its_share_of_the_queue() {
        let mut a = Admission::new(&limits(1000, 1000, 2));
        let (peer, now) = (PeerId::random(), Instant::now());
        a.admit(peer, now).unwrap();
        a.admit(peer, now).unwrap();
        assert_eq!(a.admit(peer, now), Err(Refusal::Busy));
        a.finish(&peer);
        assert_eq!(a.in_flight(&peer), 1);
        a.admit(peer, now).unwrap();
    }

    #[test]
    fn tracked_peers_stay_bounded() {
        let mut a = Admission::new(&limits(1000, 10, 4));
        let t0 = Instant::now();
        for _ in 0..MAX_TRACKED_PEERS {
            let p = PeerId::random();
            a.admit(p, t0).unwrap();
            a.finish(&p);
        }
        a.admit(PeerId::random(), t0 + Duration::from_secs(1))
            .unwrap();
        assert!(a.peers.len() < MAX_TRACKED_PEERS);
    }

    #[test]
    fn a_peer_with_many_queued_items_waits_its_turn() {
        let mut q = FairQueue::new(5);
        let (flood, honest) = (PeerId::random(), PeerId::random());
        for i in 0..4 {
            q.push(flood, i).unwrap();
        }
        q.push(honest, 100).unwrap();
        assert_eq!(q.push(honest, 101), Err(101), "capacity holds");
        let order: Vec<i32> = std::iter::from_fn(|| q.pop().map(|(_, i)| i)).collect();
        assert_eq!(order, vec![0, 100, 1, 2, 3]);
        assert!(q.is_empty());
    }
}
