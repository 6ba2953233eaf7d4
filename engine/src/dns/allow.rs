//! The allow set: the addresses each service may reach because an allowed name resolved to them,
//! each for the answer's TTL clamped to a floor and a cap.
//!
//! An entry is `(service, address, protocol, ports)` — exactly one kernel rule. The set calls its
//! [`AllowSink`] with [`AllowChange::Added`] when an entry appears and [`AllowChange::Removed`]
//! when it expires; a refresh that only extends an entry's life is silent. The sink runs
//! synchronously, under the set's lock, before the proxy answers the client: a kernel map update
//! made there is in force before the client can connect, and changes reach the sink in the
//! order they happen. The sink must therefore be quick and must not call back into the set.
//!
//! Expiry uses a deadline queue (a binary heap of `(deadline, entry)`; a popped deadline that
//! is older than the entry's current one is skipped). [`AllowSet::sweep`] removes what is due;
//! [`AllowSet::run_sweeper`] does so in a task that sleeps until the next deadline.
//!
//! The set also remembers, for a while, which names resolved to which addresses (from any
//! service's queries), so that an address that enters a service's set through an allowed name
//! and also stands behind a name that service may not resolve is reported as a
//! [`SharedAddress`] conflict (once per pair while both are remembered).

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::names::{Grant, NameMatcher};
use crate::policy::{PortRange, Proto};

/// One entry: `service` may reach `addr` with `proto` on `ports`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowEntry {
    /// Service name.
    pub service: Arc<str>,
    /// Address (IPv4-mapped IPv6 is folded into IPv4).
    pub addr: IpAddr,
    /// Protocol.
    pub proto: Proto,
    /// Port range.
    pub ports: PortRange,
}

/// A change of the allow set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowChange {
    /// The entry is new: allow it in the kernel.
    Added(AllowEntry),
    /// The entry expired: remove it from the kernel.
    Removed(AllowEntry),
}

/// Where changes go (the agent: kernel map updates). Called synchronously under the set's lock;
/// see the module docs.
pub trait AllowSink: Send + Sync {
    /// One change.
    fn changed(&self, change: &AllowChange);
}

impl<F: Fn(&AllowChange) + Send + Sync> AllowSink for F {
    fn changed(&self, change: &AllowChange) {
        self(change);
    }
}

/// Bounds on how long an answer's address stays allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlBounds {
    /// Shortest life of an entry, whatever the record's TTL (covers clients that connect a
    /// little after the answer, and TTL 0 answers).
    pub floor: Duration,
    /// Longest life. The proxy also lowers the TTLs it hands to clients to this, so a client
    /// never caches an address longer than the set allows it.
    pub cap: Duration,
}

impl Default for TtlBounds {
    fn default() -> Self {
        TtlBounds { floor: Duration::from_secs(5), cap: Duration::from_secs(3600) }
    }
}

impl TtlBounds {
    /// The life of an entry for a record with `ttl` seconds.
    pub fn clamp(&self, ttl: u32) -> Duration {
        Duration::from_secs(u64::from(ttl)).clamp(self.floor, self.cap.max(self.floor))
    }

    /// The cap in whole seconds, for rewriting answer TTLs.
    pub fn cap_secs(&self) -> u32 {
        u32::try_from(self.cap.as_secs()).unwrap_or(u32::MAX)
    }
}

/// An address that a service may reach through `allowed_name`, and that also stands behind
/// `denied_name`, which that service may not resolve.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SharedAddress {
    /// The service.
    pub service: Arc<str>,
    /// The shared address.
    pub addr: IpAddr,
    /// The name the service may resolve.
    pub allowed_name: String,
    /// The name it may not resolve.
    pub denied_name: String,
}

/// What [`AllowSet::admit`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// Entries that were new.
    pub added: usize,
    /// Entries that existed and were refreshed (or left, when they already lived longer).
    pub refreshed: usize,
    /// Addresses left out because the set is full.
    pub rejected_full: Vec<IpAddr>,
}

/// How many names per address, and addresses in all, the conflict memory keeps.
const MAX_NAMES_PER_ADDR: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Entry(u64),
    Seen(u64),
}

/// A name seen behind an address, until when it is remembered.
type Seen = (Box<str>, Instant);

#[derive(Debug, Default)]
struct State {
    entries: HashMap<AllowEntry, (Instant, u64)>,
    /// Entry id → entry, for the deadline queue.
    by_id: HashMap<u64, AllowEntry>,
    /// Names seen per address, with when they are forgotten.
    seen: HashMap<IpAddr, (Vec<Seen>, u64)>,
    seen_by_id: HashMap<u64, IpAddr>,
    /// Conflicts already reported, forgotten with the observation.
    reported: HashMap<SharedAddress, Instant>,
    queue: BinaryHeap<Reverse<(Instant, Key)>>,
    next_id: u64,
}

/// The set of addresses services may reach through DNS answers. Shared (`Arc`) between the
/// proxy, the sweeper and the agent.
pub struct AllowSet {
    bounds: TtlBounds,
    max_entries: usize,
    sink: Box<dyn AllowSink>,
    state: Mutex<State>,
    wake: Notify,
}

impl std::fmt::Debug for AllowSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllowSet").field("bounds", &self.bounds).field("max_entries", &self.max_entries).finish()
    }
}

impl AllowSet {
    /// An empty set. It holds at most `max_entries` entries (the kernel map's room); `sink` gets
    /// every change.
    pub fn new(bounds: TtlBounds, max_entries: usize, sink: impl AllowSink + 'static) -> AllowSet {
        AllowSet { bounds, max_entries, sink: Box::new(sink), state: Mutex::new(State::default()), wake: Notify::new() }
    }

    /// The TTL bounds.
    pub fn bounds(&self) -> TtlBounds {
        self.bounds
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves consistent maps (every update is a
        // single insert or remove), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits the addresses an allowed name resolved to: each `(addr, ttl)` with each grant.
    /// An entry lives until `now + clamp(ttl)`, or longer if it already did.
    pub fn admit(&self, service: &Arc<str>, grants: &[Grant], addrs: &[(IpAddr, u32)], now: Instant) -> Admitted {
        let mut out = Admitted::default();
        let mut state = self.lock();
        let mut earliest_new = None::<Instant>;
        for &(addr, ttl) in addrs {
            let deadline = now + self.bounds.clamp(ttl);
            for grant in grants {
                let entry = AllowEntry {
                    service: Arc::clone(service),
                    addr: addr.to_canonical(),
                    proto: grant.proto,
                    ports: grant.ports,
                };
                let full = state.entries.len() >= self.max_entries;
                let id = state.next_id;
                match state.entries.entry(entry) {
                    Entry::Occupied(mut slot) => {
                        out.refreshed += 1;
                        // The queued deadline stays; the sweep re-queues the entry at its
                        // current deadline when it pops early, so the queue holds one element
                        // per entry however often it is refreshed.
                        let (until, id) = *slot.get();
                        if deadline > until {
                            slot.insert((deadline, id));
                        }
                    }
                    Entry::Vacant(_) if full => {
                        if !out.rejected_full.contains(&addr) {
                            out.rejected_full.push(addr);
                        }
                    }
                    Entry::Vacant(slot) => {
                        let entry = slot.key().clone();
                        slot.insert((deadline, id));
                        state.next_id += 1;
                        state.by_id.insert(id, entry.clone());
                        state.queue.push(Reverse((deadline, Key::Entry(id))));
                        earliest_new = Some(earliest_new.map_or(deadline, |e| e.min(deadline)));
                        out.added += 1;
                        self.sink.changed(&AllowChange::Added(entry));
                    }
                }
            }
        }
        drop(state);
        if earliest_new.is_some() {
            self.wake.notify_one();
        }
        out
    }

    /// Records that `name` resolved to `addrs` (for any service) and returns the conflicts this
    /// reveals for `service`, whose allowed names are `names`: an address behind both a name it
    /// may resolve and one it may not. Each conflict is returned once while remembered.
    pub fn observe(
        &self,
        service: &Arc<str>,
        names: &NameMatcher,
        name: &str,
        addrs: &[(IpAddr, u32)],
        now: Instant,
    ) -> Vec<SharedAddress> {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        let asked_allowed = names.matches(&name);
        let mut conflicts = Vec::new();
        let mut state = self.lock();
        for &(addr, ttl) in addrs {
            let addr = addr.to_canonical();
            let forget = now + self.bounds.clamp(ttl);
            let id = state.next_id;
            let (seen, seen_id) = state.seen.entry(addr).or_insert_with(|| (Vec::new(), id));
            let seen_id = *seen_id;
            for (other, _) in seen.iter().filter(|(other, until)| **other != *name && *until > now) {
                let other_allowed = names.matches(other);
                let pair = match (asked_allowed, other_allowed) {
                    (true, false) => Some((name.clone(), other.to_string())),
                    (false, true) => Some((other.to_string(), name.clone())),
                    _ => None,
                };
                if let Some((allowed_name, denied_name)) = pair {
                    conflicts.push(SharedAddress { service: Arc::clone(service), addr, allowed_name, denied_name });
                }
            }
            if let Some((_, until)) = seen.iter_mut().find(|(other, _)| **other == *name) {
                *until = (*until).max(forget);
            } else if seen.len() < MAX_NAMES_PER_ADDR {
                seen.push((name.clone().into_boxed_str(), forget));
            }
            if seen_id == id {
                state.next_id += 1;
                state.seen_by_id.insert(id, addr);
                state.queue.push(Reverse((forget, Key::Seen(seen_id))));
            }
        }
        conflicts.retain(|c| match state.reported.entry(c.clone()) {
            Entry::Occupied(_) => false,
            Entry::Vacant(slot) => {
                slot.insert(now + self.bounds.cap);
                true
            }
        });
        conflicts
    }

    /// Removes every entry whose deadline is at or before `now` (telling the sink) and forgets
    /// expired observations. Returns the entries removed.
    pub fn sweep(&self, now: Instant) -> Vec<AllowEntry> {
        let mut removed = Vec::new();
        let mut state = self.lock();
        while let Some(Reverse((deadline, key))) = state.queue.peek().copied() {
            if deadline > now {
                break;
            }
            state.queue.pop();
            match key {
                Key::Entry(id) => {
                    let Some(entry) = state.by_id.get(&id).cloned() else { continue };
                    // Refreshed since it was queued: queue it again at its deadline.
                    if let Some((until, _)) = state.entries.get(&entry).filter(|(until, _)| *until > now) {
                        let until = *until;
                        state.queue.push(Reverse((until, key)));
                        continue;
                    }
                    state.entries.remove(&entry);
                    state.by_id.remove(&id);
                    self.sink.changed(&AllowChange::Removed(entry.clone()));
                    removed.push(entry);
                }
                Key::Seen(id) => {
                    let Some(addr) = state.seen_by_id.get(&id).copied() else { continue };
                    let mut requeue = None;
                    if let Some((names, _)) = state.seen.get_mut(&addr) {
                        names.retain(|(_, until)| *until > now);
                        requeue = names.iter().map(|(_, until)| *until).min();
                    }
                    match requeue {
                        Some(until) => state.queue.push(Reverse((until, key))),
                        None => {
                            state.seen.remove(&addr);
                            state.seen_by_id.remove(&id);
                        }
                    }
                }
            }
        }
        state.reported.retain(|_, until| *until > now);
        removed
    }

    /// The next deadline, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lock().queue.peek().map(|Reverse((deadline, _))| *deadline)
    }

    /// Sweeps at every deadline, forever (spawn it; abort the task to stop it).
    pub async fn run_sweeper(self: Arc<Self>) {
        loop {
            let notified = self.wake.notified();
            match self.next_deadline() {
                Some(deadline) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(deadline.into()) => {
                            self.sweep(super::now());
                        }
                        () = notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// The live addresses of `service`, each with the latest deadline of its entries, sorted by
    /// address.
    pub fn live(&self, service: &str) -> Vec<(IpAddr, Instant)> {
        let state = self.lock();
        let mut by_addr: HashMap<IpAddr, Instant> = HashMap::new();
        for (entry, (until, _)) in state.entries.iter().filter(|(e, _)| &*e.service == service) {
            let slot = by_addr.entry(entry.addr).or_insert(*until);
            *slot = (*slot).max(*until);
        }
        let mut out: Vec<_> = by_addr.into_iter().collect();
        out.sort_unstable();
        out
    }

    /// Every live entry of `service` with its deadline, sorted.
    pub fn entries(&self, service: &str) -> Vec<(AllowEntry, Instant)> {
        let state = self.lock();
        let mut out: Vec<_> =
            state.entries.iter().filter(|(e, _)| &*e.service == service).map(|(e, (t, _))| (e.clone(), *t)).collect();
        out.sort_unstable();
        out
    }

    /// Number of live entries (all services).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// True when there is no live entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]

    use super::*;
    use crate::policy::HostPattern;

    fn recorder() -> (Arc<Mutex<Vec<AllowChange>>>, impl AllowSink) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = {
            let log = Arc::clone(&log);
            move |c: &AllowChange| log.lock().unwrap().push(c.clone())
        };
        (log, sink)
    }

    const ANY: Grant = Grant { proto: Proto::Any, ports: PortRange::ANY };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ttl_is_clamped_to_floor_and_cap() {
        let b = TtlBounds { floor: Duration::from_secs(5), cap: Duration::from_secs(3600) };
        assert_eq!(b.clamp(0), Duration::from_secs(5));
        assert_eq!(b.clamp(4), Duration::from_secs(5));
        assert_eq!(b.clamp(60), Duration::from_secs(60));
        assert_eq!(b.clamp(86400), Duration::from_secs(3600));
        assert_eq!(b.cap_secs(), 3600);
        let odd = TtlBounds { floor: Duration::from_secs(10), cap: Duration::from_secs(1) };
        assert_eq!(odd.clamp(100), Duration::from_secs(10), "a cap below the floor yields the floor");
    }

    #[test]
    fn entries_are_added_once_refreshed_silently_and_removed_at_expiry() {
        let (log, sink) = recorder();
        let set = AllowSet::new(TtlBounds { floor: Duration::from_secs(5), cap: Duration::from_secs(100) }, 100, sink);
        let svc: Arc<str> = Arc::from("web");
        let t0 = Instant::now();
        let a = ip("10.0.0.1");
        let r = set.admit(&svc, &[ANY], &[(a, 1)], t0);
        assert_eq!((r.added, r.refreshed), (1, 0));
        // Refresh with a longer TTL: no change event, later deadline.
        let r = set.admit(&svc, &[ANY], &[(a, 30)], t0 + Duration::from_secs(2));
        assert_eq!((r.added, r.refreshed), (0, 1));
        // A shorter TTL later does not shorten it.
        set.admit(&svc, &[ANY], &[(a, 0)], t0 + Duration::from_secs(3));
        assert_eq!(set.live("web"), vec![(a, t0 + Duration::from_secs(32))]);
        // The first deadline (t0+5) is stale: nothing is removed then.
        assert!(set.sweep(t0 + Duration::from_secs(10)).is_empty());
        assert_eq!(set.len(), 1);
        let removed = set.sweep(t0 + Duration::from_secs(32));
        assert_eq!(removed.len(), 1);
        assert!(set.is_empty());
        assert!(set.live("web").is_empty());
        let entry = AllowEntry { service: svc, addr: a, proto: Proto::Any, ports: PortRange::ANY };
        assert_eq!(*log.lock().unwrap(), vec![AllowChange::Added(entry.clone()), AllowChange::Removed(entry)]);
    }

    #[test]
    fn one_entry_per_grant_and_mapped_addresses_fold_to_ipv4() {
        let (log, sink) = recorder();
        let set = AllowSet::new(TtlBounds::default(), 100, sink);
        let svc: Arc<str> = Arc::from("web");
        let udp = Grant { proto: Proto::Udp, ports: PortRange { first: 8125, last: 8125 } };
        let tcp = Grant { proto: Proto::Tcp, ports: PortRange { first: 443, last: 443 } };
        set.admit(&svc, &[udp, tcp], &[(ip("::ffff:10.0.0.2"), 60), (ip("fd00::2"), 60)], Instant::now());
        let entries = set.entries("web");
        assert_eq!(entries.len(), 4);
        assert!(entries.iter().any(|(e, _)| e.addr == ip("10.0.0.2") && e.proto == Proto::Udp));
        assert_eq!(set.live("web").len(), 2);
        assert!(set.live("other").is_empty());
        assert_eq!(log.lock().unwrap().len(), 4);
    }

    #[test]
    fn a_full_set_rejects_new_entries_but_refreshes_old_ones() {
        let (_log, sink) = recorder();
        let set = AllowSet::new(TtlBounds::default(), 2, sink);
        let svc: Arc<str> = Arc::from("web");
        let now = Instant::now();
        set.admit(&svc, &[ANY], &[(ip("10.0.0.1"), 60), (ip("10.0.0.2"), 60)], now);
        let r = set.admit(&svc, &[ANY], &[(ip("10.0.0.3"), 60), (ip("10.0.0.1"), 60)], now);
        assert_eq!(r.rejected_full, vec![ip("10.0.0.3")]);
        assert_eq!(r.refreshed, 1);
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn shared_addresses_are_reported_once_in_either_order() {
        let (_log, sink) = recorder();
        let set = AllowSet::new(TtlBounds::default(), 100, sink);
        let svc: Arc<str> = Arc::from("web");
        let wild = HostPattern::parse("*.mirror.internal").unwrap();
        let names = NameMatcher::new([(&wild, ANY)]);
        let now = Instant::now();
        let shared = ip("10.0.0.66");
        // Denied name first (audit, or another service), then the allowed one.
        assert!(set.observe(&svc, &names, "evilmirror.internal", &[(shared, 60)], now).is_empty());
        let c = set.observe(&svc, &names, "shared.mirror.internal.", &[(shared, 60)], now);
        assert_eq!(
            c,
            vec![SharedAddress {
                service: Arc::clone(&svc),
                addr: shared,
                allowed_name: "shared.mirror.internal".into(),
                denied_name: "evilmirror.internal".into(),
            }]
        );
        // Once only.
        assert!(set.observe(&svc, &names, "shared.mirror.internal", &[(shared, 60)], now).is_empty());
        assert!(set.observe(&svc, &names, "evilmirror.internal", &[(shared, 60)], now).is_empty());
        // Allowed first, then denied, on another address.
        let other = ip("10.0.0.67");
        assert!(set.observe(&svc, &names, "b.mirror.internal", &[(other, 60)], now).is_empty());
        let c = set.observe(&svc, &names, "MIRROR.internal.evil", &[(other, 60)], now);
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].allowed_name.as_str(), c[0].denied_name.as_str()),
            ("b.mirror.internal", "mirror.internal.evil")
        );
        // A further allowed name on that address is a further pair.
        let c = set.observe(&svc, &names, "c.mirror.internal", &[(other, 60)], now);
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].allowed_name.as_str(), c[0].denied_name.as_str()),
            ("c.mirror.internal", "mirror.internal.evil")
        );
        // Two allowed names on one address are no conflict.
        let third = ip("fd00::68");
        assert!(set.observe(&svc, &names, "d.mirror.internal", &[(third, 60)], now).is_empty());
        assert!(set.observe(&svc, &names, "e.mirror.internal", &[(third, 60)], now).is_empty());
        // Another service, which may resolve `evilmirror.internal` only: the same observations
        // are a conflict for it the other way round.
        let exact = HostPattern::parse("evilmirror.internal").unwrap();
        let other_names = NameMatcher::new([(&exact, ANY)]);
        let batch: Arc<str> = Arc::from("batch");
        let c = set.observe(&batch, &other_names, "evilmirror.internal", &[(shared, 60)], now);
        assert_eq!(c.len(), 1);
        assert_eq!(
            (&*c[0].service, c[0].allowed_name.as_str(), c[0].denied_name.as_str()),
            ("batch", "evilmirror.internal", "shared.mirror.internal")
        );
        // Forgotten after expiry: no conflict with a name seen long ago.
        set.sweep(now + Duration::from_secs(7200));
        let later = now + Duration::from_secs(7200);
        assert!(set.observe(&svc, &names, "z.mirror.internal", &[(shared, 60)], later).is_empty());
    }

    #[tokio::test]
    async fn the_sweeper_removes_entries_at_their_deadline() {
        let (log, sink) = recorder();
        let set = Arc::new(AllowSet::new(
            TtlBounds { floor: Duration::from_millis(300), cap: Duration::from_secs(100) },
            100,
            sink,
        ));
        let task = tokio::spawn(Arc::clone(&set).run_sweeper());
        let svc: Arc<str> = Arc::from("web");
        let t0 = crate::dns::now();
        // TTL 0 lives for the floor (300 ms); TTL 1 for a second. The sweeper sleeps with an
        // empty queue and must wake for the first admission.
        tokio::time::sleep(Duration::from_millis(50)).await;
        set.admit(&svc, &[ANY], &[(ip("10.0.0.1"), 1)], crate::dns::now());
        set.admit(&svc, &[ANY], &[(ip("10.0.0.2"), 0)], crate::dns::now());
        let poll = |want: usize| {
            let set = Arc::clone(&set);
            async move {
                for _ in 0..300 {
                    if set.len() == want {
                        return crate::dns::now();
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                panic!("the set never shrank to {want}");
            }
        };
        let first = poll(1).await - t0;
        assert!(first >= Duration::from_millis(340) && first < Duration::from_millis(800), "{first:?}");
        assert_eq!(set.live("web").iter().map(|(a, _)| *a).collect::<Vec<_>>(), vec![ip("10.0.0.1")]);
        let second = poll(0).await - t0;
        assert!(second >= Duration::from_millis(1040) && second < Duration::from_millis(1500), "{second:?}");
        assert_eq!(log.lock().unwrap().len(), 4);
        task.abort();
    }
}
