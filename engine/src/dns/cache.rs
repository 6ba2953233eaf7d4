//! The answer cache: upstream answers kept by question, so that a question asked again within
//! the answer's TTL is not sent upstream again.
//!
//! What it holds is policy-free: the upstream's answer to a question, nothing about who asked.
//! Judging the asker, admitting the answered addresses into the allow set and reporting the
//! question all happen on every question, hit or miss, in the answering code (`answer`); a
//! denied name never reaches the cache.
//!
//! - **Key**: the name lowercased, the type, the class, and the header bits that change what the
//!   upstream answers and that the proxy forwards: RD, and the DNSSEC bits DO and CD. EDNS
//!   options are not part of the key: every asker is a process on this host.
//! - **Life**: a positive answer lives for its smallest TTL (answer and authority sections),
//!   at most the cap; a negative one (NXDOMAIN, or NOERROR with no answer: NODATA) for its SOA's
//!   TTL or minimum, whichever is smaller (RFC 2308 §5), at most the negative cap; without an
//!   SOA it is not cached. Nothing else is cached: SERVFAIL, REFUSED, other codes, truncated
//!   answers, TTL 0.
//! - **Age**: an answer handed out from the cache has every TTL lowered by the whole seconds the
//!   entry has lived, so the client and the allow set see what is left of it. A negative
//!   answer's SOA goes out with the negative TTL (its TTL or minimum, RFC 2308 §3).
//! - **Bounds**: at most `max_entries` entries and `max_bytes` bytes of answers (their wire
//!   size); beyond either the least recently used entries go. Expired entries go when they are
//!   looked up, or first when room is needed.
//!
//! Time is always given (`now`), so tests drive it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, RecordType};

/// How large the cache may grow and how long negative answers live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// Entries at most; 0 turns the cache off.
    pub max_entries: usize,
    /// Bytes of answers (wire size) at most.
    pub max_bytes: usize,
    /// Longest life of a negative answer (NXDOMAIN, NODATA); positive answers live at most the
    /// TTL cap ([`TtlBounds::cap`](super::TtlBounds::cap)).
    pub negative_cap: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings { max_entries: 4096, max_bytes: 4 << 20, negative_cap: Duration::from_secs(300) }
    }
}

/// Hits and misses so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Questions answered from the cache.
    pub hits: u64,
    /// Questions looked up and not found (then asked upstream).
    pub misses: u64,
    /// Entries in the cache now.
    pub entries: usize,
    /// Their bytes.
    pub bytes: usize,
}

/// What identifies a question's answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey {
    name: Box<str>,
    qtype: RecordType,
    qclass: DNSClass,
    recursion_desired: bool,
    dnssec_ok: bool,
    checking_disabled: bool,
}

impl CacheKey {
    /// The key of `query`: None unless it is a standard query of exactly one question.
    pub(crate) fn of(query: &Message) -> Option<CacheKey> {
        if query.metadata.message_type != MessageType::Query || query.metadata.op_code != OpCode::Query {
            return None;
        }
        let [question] = query.queries.as_slice() else { return None };
        Some(CacheKey {
            name: question.name.to_ascii().trim_end_matches('.').to_ascii_lowercase().into_boxed_str(),
            qtype: question.query_type,
            qclass: question.query_class,
            recursion_desired: query.metadata.recursion_desired,
            dnssec_ok: query.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
            checking_disabled: query.metadata.checking_disabled,
        })
    }
}

#[derive(Debug)]
struct Entry {
    answer: Message,
    stored: Instant,
    expires: Instant,
    bytes: usize,
    /// Its place in the recency order.
    tick: u64,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<CacheKey, Entry>,
    /// Recency: tick → key, oldest first.
    order: BTreeMap<u64, CacheKey>,
    next_tick: u64,
    bytes: usize,
}

impl State {
    fn remove(&mut self, key: &CacheKey) {
        if let Some(entry) = self.entries.remove(key) {
            self.order.remove(&entry.tick);
            self.bytes = self.bytes.saturating_sub(entry.bytes);
        }
    }

    fn evict_oldest(&mut self) -> bool {
        let Some((_, key)) = self.order.pop_first() else { return false };
        if let Some(entry) = self.entries.remove(&key) {
            self.bytes = self.bytes.saturating_sub(entry.bytes);
        }
        true
    }
}

/// Upstream answers by question, bounded, each for its TTL. Shared by the proxy's tasks.
#[derive(Debug)]
pub struct AnswerCache {
    settings: CacheSettings,
    cap: Duration,
    state: Mutex<State>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl AnswerCache {
    /// An empty cache bounded by `settings`; positive answers live at most `cap`.
    pub fn new(settings: CacheSettings, cap: Duration) -> AnswerCache {
        AnswerCache {
            settings,
            cap,
            state: Mutex::new(State::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// False when the cache is off (no entries allowed).
    pub fn enabled(&self) -> bool {
        self.settings.max_entries > 0 && self.settings.max_bytes > 0
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the maps consistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The answer stored for `key` at `now`, its TTLs lowered by its age, and counted as a hit;
    /// None (a miss) when there is none or it has expired.
    pub(crate) fn get(&self, key: &CacheKey, now: Instant) -> Option<Message> {
        let mut state = self.lock();
        let tick = state.next_tick;
        let found = match state.entries.get_mut(key) {
            Some(entry) if entry.expires > now => {
                let old = std::mem::replace(&mut entry.tick, tick);
                let age = u32::try_from(now.saturating_duration_since(entry.stored).as_secs()).unwrap_or(u32::MAX);
                let mut answer = entry.answer.clone();
                for record in
                    answer.answers.iter_mut().chain(answer.authorities.iter_mut()).chain(answer.additionals.iter_mut())
                {
                    record.ttl = record.ttl.saturating_sub(age);
                }
                Some((old, answer))
            }
            Some(_) => {
                state.remove(key);
                None
            }
            None => None,
        };
        match found {
            Some((old, answer)) => {
                state.order.remove(&old);
                state.order.insert(tick, key.clone());
                state.next_tick += 1;
                drop(state);
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(answer)
            }
            None => {
                drop(state);
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Stores the upstream's `answer` to the question of `key` received at `now`, if it may be
    /// cached (see the module docs); the least recently used entries make room.
    pub(crate) fn put(&self, key: CacheKey, answer: &Message, now: Instant) {
        if !self.enabled() {
            return;
        }
        let Some(life) = self.life(answer) else { return };
        // The wire size, as the bound counts it; an answer that does not encode is not kept.
        let Ok(bytes) = answer.to_vec().map(|b| b.len()) else { return };
        if bytes > self.settings.max_bytes {
            return;
        }
        let mut answer = answer.clone();
        if answer.answers.is_empty() {
            // A negative answer's SOA is handed out with the negative TTL (RFC 2308 §3).
            for record in &mut answer.authorities {
                if let RData::SOA(soa) = &record.data {
                    record.ttl = record.ttl.min(soa.minimum);
                }
            }
        }
        let mut state = self.lock();
        state.remove(&key);
        while state.entries.len() >= self.settings.max_entries || state.bytes + bytes > self.settings.max_bytes {
            // Expired entries first would need a scan; the least recently used is close enough.
            if !state.evict_oldest() {
                break;
            }
        }
        let tick = state.next_tick;
        state.next_tick += 1;
        state.order.insert(tick, key.clone());
        state.bytes += bytes;
        state.entries.insert(key, Entry { answer, stored: now, expires: now + life, bytes, tick });
    }

    /// How long `answer` may be kept: None when it may not be.
    fn life(&self, answer: &Message) -> Option<Duration> {
        if answer.metadata.truncation || answer.metadata.message_type != MessageType::Response {
            return None;
        }
        let secs = match answer.metadata.response_code {
            ResponseCode::NoError if !answer.answers.is_empty() => {
                let ttl = answer.answers.iter().chain(&answer.authorities).map(|r| r.ttl).min()?;
                Duration::from_secs(u64::from(ttl)).min(self.cap)
            }
            ResponseCode::NoError | ResponseCode::NXDomain => {
                // RFC 2308 §5: the SOA's TTL or its minimum, whichever is smaller.
                let ttl = answer
                    .authorities
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                        _ => None,
                    })
                    .min()?;
                Duration::from_secs(u64::from(ttl)).min(self.cap).min(self.settings.negative_cap)
            }
            _ => return None,
        };
        (!secs.is_zero()).then_some(secs)
    }

    /// Hits, misses and size.
    pub fn stats(&self) -> CacheStats {
        let state = self.lock();
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: state.entries.len(),
            bytes: state.bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]

    use super::*;
    use hickory_proto::op::{Edns, Query};
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{Name, Record};

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn query(qname: &str, qtype: RecordType) -> Message {
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(name(qname), qtype));
        q
    }

    fn positive(qname: &str, ttl: u32) -> Message {
        let mut m = Message::response(1, OpCode::Query);
        m.add_query(Query::query(name(qname), RecordType::A));
        m.add_answer(Record::from_rdata(name(qname), ttl, RData::A(A([10, 0, 0, 10].into()))));
        m
    }

    fn negative(qname: &str, rcode: ResponseCode, soa_ttl: u32, minimum: u32) -> Message {
        let mut m = Message::response(1, OpCode::Query);
        m.metadata.response_code = rcode;
        m.add_query(Query::query(name(qname), RecordType::A));
        let soa = SOA::new(name("internal."), name("hostmaster.internal."), 1, 3600, 600, 86_400, minimum);
        m.add_authority(Record::from_rdata(name("internal."), soa_ttl, RData::SOA(soa)));
        m
    }

    fn cache() -> AnswerCache {
        AnswerCache::new(CacheSettings::default(), Duration::from_secs(3600))
    }

    fn key(qname: &str) -> CacheKey {
        CacheKey::of(&query(qname, RecordType::A)).unwrap()
    }

    #[test]
    fn keys_ignore_case_and_the_final_dot_but_not_type_class_or_dnssec_bits() {
        assert_eq!(key("A.Mirror.Internal."), key("a.mirror.internal"));
        assert_ne!(CacheKey::of(&query("a.x.", RecordType::AAAA)).unwrap(), key("a.x."));
        let mut cd = query("a.x.", RecordType::A);
        cd.metadata.checking_disabled = true;
        assert_ne!(CacheKey::of(&cd).unwrap(), key("a.x."));
        let mut rd = query("a.x.", RecordType::A);
        rd.metadata.recursion_desired = false;
        assert_ne!(CacheKey::of(&rd).unwrap(), key("a.x."));
        let mut edns = Edns::new();
        edns.set_dnssec_ok(true);
        let mut dnssec = query("a.x.", RecordType::A);
        dnssec.set_edns(edns);
        assert_ne!(CacheKey::of(&dnssec).unwrap(), key("a.x."));
        // EDNS without DO: the same answer.
        let mut plain_edns = query("a.x.", RecordType::A);
        plain_edns.set_edns(Edns::new());
        assert_eq!(CacheKey::of(&plain_edns).unwrap(), key("a.x."));
        let mut two = query("a.x.", RecordType::A);
        two.add_query(Query::query(name("b.x."), RecordType::A));
        assert!(CacheKey::of(&two).is_none());
    }

    #[test]
    fn a_positive_answer_lives_its_ttl_and_ages() {
        let cache = cache();
        let t0 = Instant::now();
        cache.put(key("a.x"), &positive("a.x.", 30), t0);
        let hit = cache.get(&key("A.X."), t0 + Duration::from_millis(10_400)).unwrap();
        assert_eq!(hit.answers[0].ttl, 20, "TTL lowered by the whole seconds of age");
        assert!(cache.get(&key("a.x"), t0 + Duration::from_secs(30)).is_none(), "expired");
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.entries, stats.bytes), (1, 1, 0, 0));
    }

    #[test]
    fn a_positive_answer_lives_at_most_the_cap() {
        let cache = AnswerCache::new(CacheSettings::default(), Duration::from_secs(10));
        let t0 = Instant::now();
        cache.put(key("a.x"), &positive("a.x.", 86_400), t0);
        assert!(cache.get(&key("a.x"), t0 + Duration::from_secs(9)).is_some());
        assert!(cache.get(&key("a.x"), t0 + Duration::from_secs(10)).is_none());
    }

    #[test]
    fn negative_answers_live_by_the_soa_minimum_capped() {
        let cache = cache();
        let t0 = Instant::now();
        // NXDOMAIN: the SOA's minimum (20) is below its TTL (60).
        cache.put(key("gone.x"), &negative("gone.x.", ResponseCode::NXDomain, 60, 20), t0);
        // NODATA: NOERROR, no answer; the SOA's TTL (15) is below its minimum.
        cache.put(key("empty.x"), &negative("empty.x.", ResponseCode::NoError, 15, 900), t0);
        // The negative cap (300 s) bounds a long minimum.
        cache.put(key("long.x"), &negative("long.x.", ResponseCode::NXDomain, 86_400, 86_400), t0);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let hit = cache.get(&key("gone.x"), at(5)).unwrap();
        assert_eq!(hit.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(hit.authorities[0].ttl, 15, "the SOA goes out with the negative TTL, aged");
        assert!(cache.get(&key("gone.x"), at(20)).is_none());
        assert!(cache.get(&key("empty.x"), at(14)).is_some());
        assert!(cache.get(&key("empty.x"), at(15)).is_none());
        assert!(cache.get(&key("long.x"), at(299)).is_some());
        assert!(cache.get(&key("long.x"), at(300)).is_none());
        // Without an SOA a negative answer is not kept.
        let mut bare = Message::response(1, OpCode::Query);
        bare.metadata.response_code = ResponseCode::NXDomain;
        cache.put(key("bare.x"), &bare, t0);
        assert!(cache.get(&key("bare.x"), t0).is_none());
    }

    #[test]
    fn failures_truncated_answers_and_ttl_zero_are_not_kept() {
        let cache = cache();
        let t0 = Instant::now();
        for rcode in [ResponseCode::ServFail, ResponseCode::Refused, ResponseCode::FormErr, ResponseCode::NotImp] {
            let mut m = negative("f.x.", rcode, 60, 60);
            m.add_answer(Record::from_rdata(name("f.x."), 60, RData::A(A([10, 0, 0, 1].into()))));
            cache.put(key("f.x"), &m, t0);
        }
        let mut truncated = positive("t.x.", 60);
        truncated.metadata.truncation = true;
        cache.put(key("t.x"), &truncated, t0);
        cache.put(key("z.x"), &positive("z.x.", 0), t0);
        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn the_least_recently_used_entries_make_room() {
        let settings = CacheSettings { max_entries: 2, ..CacheSettings::default() };
        let cache = AnswerCache::new(settings, Duration::from_secs(3600));
        let t0 = Instant::now();
        cache.put(key("a.x"), &positive("a.x.", 60), t0);
        cache.put(key("b.x"), &positive("b.x.", 60), t0);
        assert!(cache.get(&key("a.x"), t0).is_some());
        cache.put(key("c.x"), &positive("c.x.", 60), t0);
        assert!(cache.get(&key("b.x"), t0).is_none(), "b was the least recently used");
        assert!(cache.get(&key("a.x"), t0).is_some());
        assert!(cache.get(&key("c.x"), t0).is_some());

        // By bytes: room for about two answers.
        let one = positive("a.x.", 60).to_vec().unwrap().len();
        let settings = CacheSettings { max_bytes: 2 * one + one / 2, ..CacheSettings::default() };
        let cache = AnswerCache::new(settings, Duration::from_secs(3600));
        for n in ["a.x", "b.x", "c.x"] {
            cache.put(key(n), &positive(&format!("{n}."), 60), t0);
        }
        let stats = cache.stats();
        assert_eq!(stats.entries, 2);
        assert!(stats.bytes <= settings.max_bytes);
        assert!(cache.get(&key("a.x"), t0).is_none());

        // Off.
        let off = AnswerCache::new(CacheSettings { max_entries: 0, ..CacheSettings::default() }, Duration::MAX);
        off.put(key("a.x"), &positive("a.x.", 60), t0);
        assert_eq!(off.stats().entries, 0);
    }
}
