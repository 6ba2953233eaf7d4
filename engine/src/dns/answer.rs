//! One DNS message from receipt to reply: parsed, judged by the policy of the service its sender
//! was attributed to, forwarded upstream when allowed (the answered addresses entering the allow
//! set), and the reply built and encoded for the transport it came on.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::RData;
use tokio::time::Instant;

use arc_swap::ArcSwap;

use super::allow::AllowSet;
use super::attrib::{Attribution, Transport};
use super::cache::{AnswerCache, CacheKey, CacheSettings, CacheStats};
use super::event::{CacheUse, DnsEvent, EventSink, QueryEvent};
use super::names::DnsPolicy;
use super::upstream::{Servers, Upstream, UpstreamError};
use crate::policy::Mode;
use crate::verdict::Verdict;

/// The answer to a name a service may not resolve, in enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DenyResponse {
    /// `REFUSED`: the resolver will not answer this client (the default; stub resolvers do not
    /// cache it and report "no address").
    #[default]
    Refused,
    /// `NXDOMAIN`: the name does not exist.
    NxDomain,
}

/// What to do with a query no [`Attributor`] claims (or claimed for a service the policy does
/// not know).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unattributed {
    /// Answer `REFUSED` (the default: only redirected, attributed traffic should reach the
    /// proxy).
    #[default]
    Refuse,
    /// Forward it upstream with no policy and no allow-set entry.
    Forward,
}

/// How an [`Answerer`] treats what it may not resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AnswerSettings {
    /// The answer to a denied name in enforce.
    pub deny: DenyResponse,
    /// What to do with unattributed queries.
    pub unattributed: Unattributed,
    /// Resolve denied names in the background, to find addresses they share with allowed ones.
    pub probe_denied: bool,
}

/// The clock an [`Answerer`] reads (the cache's ages, the allow set's deadlines): [`now`](super::now)
/// unless a test gives its own.
pub type Clock = Arc<dyn Fn() -> std::time::Instant + Send + Sync>;

/// Answers DNS messages, one at a time, as the proxy does: what answering needs (the settings,
/// where to forward, the answer cache in front of it, the policy in force, the allow set the
/// answers feed, where events go) and no socket. The proxy's listeners share one; tests and the
/// fuzz targets call it directly with an in-memory [`Upstream`].
///
/// The cache only saves the trip upstream: every question is judged by its asker's policy, and
/// an answer from the cache admits its addresses (with what is left of their TTLs) and is
/// reported exactly as a fresh one.
pub struct Answerer<U = Servers> {
    settings: AnswerSettings,
    upstream: U,
    cache: AnswerCache,
    clock: Clock,
    policy: ArcSwap<DnsPolicy>,
    allow: Arc<AllowSet>,
    events: Box<dyn EventSink>,
}

impl<U: std::fmt::Debug> std::fmt::Debug for Answerer<U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answerer").field("settings", &self.settings).field("upstream", &self.upstream).finish()
    }
}

/// A reply with only a header: the query's id and opcode, `rcode`, no sections. None when the
/// bytes are not even a header, or are a response (never answer a response: no loops).
pub(super) fn header_error(bytes: &[u8], rcode: ResponseCode) -> Option<Vec<u8>> {
    let header: [u8; 12] = bytes.get(..12)?.try_into().ok()?;
    let [id0, id1, flags0, ..] = header;
    if flags0 & 0x80 != 0 {
        return None;
    }
    // QR=1, the opcode and RD copied; RA=1; the response code.
    let opcode_rd = flags0 & 0x79;
    let code = u8::try_from(u16::from(rcode) & 0x0f).unwrap_or(2);
    Some(vec![id0, id1, 0x80 | opcode_rd, 0x80 | code, 0, 0, 0, 0, 0, 0, 0, 0])
}

/// A reply to `query` with `rcode` and the question echoed.
fn error_reply(query: &Message, rcode: ResponseCode) -> Message {
    let mut reply = Message::error_msg(query.metadata.id, query.metadata.op_code, rcode);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.queries = query.queries.clone();
    if let Some(edns) = reply_edns(query) {
        reply.set_edns(edns);
    }
    reply
}

/// The OPT record of a reply to `query`: none when the query had none; else the proxy's own,
/// with the query's DNSSEC OK bit. EDNS is hop by hop: the upstream's payload size and options
/// are not the client's.
fn reply_edns(query: &Message) -> Option<Edns> {
    let asked = query.edns.as_ref()?;
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    edns.set_dnssec_ok(asked.flags().dnssec_ok);
    Some(edns)
}

/// The addresses answered for `qname`: A and AAAA records owned by it or by a name its CNAME
/// chain (at most 16 links) leads to, each with its TTL.
fn chain_addrs(answer: &Message, qname: &str) -> Vec<(IpAddr, u32)> {
    let key = |name: &hickory_proto::rr::Name| name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
    let mut chain = vec![qname.to_owned()];
    for _ in 0..16 {
        let Some(last) = chain.last() else { break };
        let next = answer.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if key(&r.name) == *last => Some(key(&target.0)),
            _ => None,
        });
        match next {
            Some(next) if !chain.contains(&next) => chain.push(next),
            _ => break,
        }
    }
    answer
        .answers
        .iter()
        .filter_map(|r| {
            let addr = match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => return None,
            };
            chain.contains(&key(&r.name)).then_some((addr, r.ttl))
        })
        .collect()
}

impl<U: Upstream> Answerer<U> {
    /// An answerer judging by `policy`, forwarding to `upstream`, admitting answered addresses
    /// into `allow` and reporting to `events`.
    pub fn new(
        settings: AnswerSettings,
        upstream: U,
        policy: DnsPolicy,
        allow: Arc<AllowSet>,
        events: impl EventSink + 'static,
    ) -> Answerer<U> {
        let cache = AnswerCache::new(CacheSettings::default(), allow.bounds().cap);
        Answerer {
            settings,
            upstream,
            cache,
            clock: Arc::new(super::now),
            policy: ArcSwap::from_pointee(policy),
            allow,
            events: Box::new(events),
        }
    }

    /// The same answerer with its answer cache bounded by `cache` (the default:
    /// [`CacheSettings::default`]; `max_entries: 0` turns it off).
    #[must_use]
    pub fn with_cache(mut self, cache: CacheSettings) -> Answerer<U> {
        self.cache = AnswerCache::new(cache, self.allow.bounds().cap);
        self
    }

    /// The same answerer reading `clock` instead of tokio's (tests: ages and expiry without
    /// sleeping).
    #[must_use]
    pub fn with_clock(mut self, clock: Clock) -> Answerer<U> {
        self.clock = clock;
        self
    }

    fn now(&self) -> std::time::Instant {
        (self.clock)()
    }

    /// The answer cache's hits, misses and size.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// The answer to `query`: from the cache when it holds one, else from upstream (and kept
    /// when it may be). Says which.
    async fn resolve(&self, query: &Message) -> (Result<Message, UpstreamError>, CacheUse) {
        let key = if self.cache.enabled() { CacheKey::of(query) } else { None };
        let Some(key) = key else { return (self.upstream.forward(query).await, CacheUse::NotAsked) };
        if let Some(hit) = self.cache.get(&key, self.now()) {
            return (Ok(hit), CacheUse::Hit);
        }
        let answer = self.upstream.forward(query).await;
        if let Ok(answer) = &answer {
            self.cache.put(key, answer, self.now());
        }
        (answer, CacheUse::Miss)
    }

    /// Where allowed questions go.
    pub fn upstream(&self) -> &U {
        &self.upstream
    }

    /// The allow set the answers feed.
    pub fn allow_set(&self) -> &Arc<AllowSet> {
        &self.allow
    }

    /// Replaces the policy; messages answered from now on are judged by it.
    pub fn set_policy(&self, policy: DnsPolicy) {
        self.policy.store(Arc::new(policy));
    }

    /// Reports an event the serving code saw (an overload).
    pub(super) fn report(&self, event: DnsEvent) {
        self.events.event(event);
    }

    /// Answers one message that `client` sent to the proxy's `local` address over `transport`,
    /// asked by `who`: the encoded reply (an answer, or a refusal or error code), or None when
    /// nothing should be sent back (the message is a response, or not even a DNS header).
    pub async fn answer(
        self: &Arc<Self>,
        bytes: &[u8],
        who: Option<Attribution>,
        client: SocketAddr,
        local: SocketAddr,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let started = Instant::now();
        let malformed = |reason: String| {
            self.events.event(DnsEvent::Malformed { client, transport, reason });
        };
        let query = match Message::from_vec(bytes) {
            Ok(q) => q,
            Err(e) => {
                malformed(format!("undecodable message: {e}"));
                return header_error(bytes, ResponseCode::FormErr);
            }
        };
        if query.metadata.message_type != MessageType::Query {
            malformed("a response, not a query".to_owned());
            return None;
        }
        if query.metadata.op_code != OpCode::Query {
            malformed(format!("opcode {:?} is not supported", query.metadata.op_code));
            return encode(&error_reply(&query, ResponseCode::NotImp), transport, &query);
        }
        let [question] = query.queries.as_slice() else {
            malformed(format!("{} questions (one is supported)", query.queries.len()));
            return encode(&error_reply(&query, ResponseCode::FormErr), transport, &query);
        };
        let name = question.name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
        let qtype = question.query_type;

        let policy = self.policy.load();
        let service = who.as_ref().and_then(|w| policy.service(&w.service).map(|p| (w, Arc::clone(p))));
        let Some((who, service)) = service else {
            let forwarded = self.settings.unattributed == Unattributed::Forward;
            self.events.event(DnsEvent::Unattributed {
                client,
                local,
                service: who.map(|w| w.service),
                name,
                transport,
                forwarded,
            });
            if !forwarded {
                return encode(&error_reply(&query, ResponseCode::Refused), transport, &query);
            }
            let reply = match self.resolve(&query).await.0 {
                Ok(answer) => self.client_reply(answer, &query),
                Err(_) => error_reply(&query, ResponseCode::ServFail),
            };
            return encode(&reply, transport, &query);
        };
        let who = who.clone();

        let grants = service.names.grants(&name);
        let verdict = crate::verdict::decide(service.mode, !grants.is_empty());
        let report = |reply: &Message, addrs: Vec<IpAddr>, upstream_error: Option<UpstreamError>, cache: CacheUse| {
            self.events.event(DnsEvent::Query(QueryEvent {
                who: who.clone(),
                name: name.clone(),
                qtype: qtype.to_string(),
                transport,
                mode: service.mode,
                verdict,
                rcode: reply.metadata.response_code.to_string(),
                addrs,
                upstream_error,
                cache,
                elapsed: started.elapsed(),
            }));
        };

        if verdict == Verdict::Rejected {
            let rcode = match self.settings.deny {
                DenyResponse::Refused => ResponseCode::Refused,
                DenyResponse::NxDomain => ResponseCode::NXDomain,
            };
            let reply = error_reply(&query, rcode);
            report(&reply, Vec::new(), None, CacheUse::NotAsked);
            if self.settings.probe_denied {
                let inner = Arc::clone(self);
                let (query, service_name, names, name) =
                    (query.clone(), Arc::clone(&who.service), service.clone(), name.clone());
                tokio::spawn(async move {
                    if let (Ok(answer), _) = inner.resolve(&query).await {
                        let addrs = chain_addrs(&answer, &name);
                        inner.observe(&service_name, &names.names, &name, &addrs);
                    }
                });
            }
            return encode(&reply, transport, &query);
        }

        // From the cache or from upstream, what follows is the same: the asker's addresses
        // admitted for what is left of their TTLs, the same event.
        let (answer, cache) = self.resolve(&query).await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                let reply = error_reply(&query, ResponseCode::ServFail);
                report(&reply, Vec::new(), Some(e), cache);
                return encode(&reply, transport, &query);
            }
        };
        let addrs = chain_addrs(&answer, &name);
        if service.mode != Mode::Off && !addrs.is_empty() {
            if !grants.is_empty() {
                // Admitted (and the sink told) before the client sees the answer.
                let admitted = self.allow.admit(&who.service, &grants, &addrs, self.now());
                if !admitted.rejected_full.is_empty() {
                    self.events.event(DnsEvent::AllowSetFull {
                        service: Arc::clone(&who.service),
                        name: name.clone(),
                        addrs: admitted.rejected_full,
                    });
                }
            }
            self.observe(&who.service, &service.names, &name, &addrs);
        }
        let reply = self.client_reply(answer, &query);
        report(&reply, addrs.iter().map(|(a, _)| *a).collect(), None, cache);
        encode(&reply, transport, &query)
    }

    fn observe(&self, service: &Arc<str>, names: &super::names::NameMatcher, name: &str, addrs: &[(IpAddr, u32)]) {
        for conflict in self.allow.observe(service, names, name, addrs, self.now()) {
            self.events.event(DnsEvent::SharedAddress(conflict));
        }
    }

    /// The upstream answer as the client gets it: the header fields a reply copies from its
    /// query (id, opcode, RD), its question and the proxy's OPT record ([`reply_edns`]), TTLs
    /// at most the cap.
    fn client_reply(&self, mut answer: Message, query: &Message) -> Message {
        answer.metadata.id = query.metadata.id;
        answer.metadata.op_code = query.metadata.op_code;
        answer.metadata.recursion_desired = query.metadata.recursion_desired;
        answer.queries = query.queries.clone();
        answer.edns = reply_edns(query);
        // An extended response code needs an OPT record to travel in.
        if answer.edns.is_none() && answer.metadata.response_code.high() > 0 {
            answer.metadata.response_code = ResponseCode::ServFail;
        }
        let cap = self.allow.bounds().cap_secs();
        for record in
            answer.answers.iter_mut().chain(answer.authorities.iter_mut()).chain(answer.additionals.iter_mut())
        {
            record.ttl = record.ttl.min(cap);
        }
        answer
    }
}

/// Encodes a reply within what the client accepts (over UDP its EDNS payload size or 512, over
/// TCP a 16-bit length): one larger (or that does not encode) is truncated (TC set, no records)
/// so that the client retries over TCP, and if even the question does not fit (a query of many
/// or long questions), the header goes alone.
fn encode(reply: &Message, transport: Transport, query: &Message) -> Option<Vec<u8>> {
    let limit = match transport {
        Transport::Udp => usize::from(query.max_payload()),
        Transport::Tcp => usize::from(u16::MAX),
    };
    let within = |m: &Message| m.to_vec().ok().filter(|bytes| bytes.len() <= limit);
    if let Some(bytes) = within(reply) {
        return Some(bytes);
    }
    let truncated = reply.truncate();
    if let Some(bytes) = within(&truncated) {
        return Some(bytes);
    }
    let mut header = Message::new(0, MessageType::Response, OpCode::Query);
    header.metadata = truncated.metadata;
    // An extended response code needs the OPT record that no longer fits.
    if header.metadata.response_code.high() > 0 {
        header.metadata.response_code = ResponseCode::ServFail;
    }
    header.to_vec().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]

    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use hickory_proto::rr::{Name, Record, RecordType};

    use std::sync::atomic::AtomicUsize;
    use std::sync::atomic::Ordering::Relaxed;

    use crate::dns::{AllowChange, Grant, NameMatcher, ServicePolicy, TtlBounds};
    use crate::policy::{HostPattern, PortRange, Proto};

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    #[test]
    fn cname_chains_give_the_final_addresses_to_the_asked_name() {
        let mut m = Message::response(1, OpCode::Query);
        m.add_answer(Record::from_rdata(
            name("cdn.mirror.internal."),
            300,
            RData::CNAME(CNAME(name("edge.cdn.example."))),
        ));
        m.add_answer(Record::from_rdata(name("EDGE.cdn.example."), 300, RData::CNAME(CNAME(name("e1.cdn.example.")))));
        m.add_answer(Record::from_rdata(name("e1.cdn.example."), 20, RData::A(A("10.1.0.1".parse().unwrap()))));
        m.add_answer(Record::from_rdata(name("e1.cdn.example."), 20, RData::AAAA(AAAA("fd00::1".parse().unwrap()))));
        // Not on the chain: must not count.
        m.add_answer(Record::from_rdata(name("other.example."), 20, RData::A(A("10.9.9.9".parse().unwrap()))));
        let addrs = chain_addrs(&m, "cdn.mirror.internal");
        assert_eq!(addrs, vec![("10.1.0.1".parse().unwrap(), 20), ("fd00::1".parse().unwrap(), 20)]);
        assert!(chain_addrs(&m, "nothing.here").is_empty());
    }

    #[test]
    fn cname_loops_end() {
        let mut m = Message::response(1, OpCode::Query);
        m.add_answer(Record::from_rdata(name("a.x."), 300, RData::CNAME(CNAME(name("b.x.")))));
        m.add_answer(Record::from_rdata(name("b.x."), 300, RData::CNAME(CNAME(name("a.x.")))));
        assert!(chain_addrs(&m, "a.x").is_empty());
    }

    #[test]
    fn header_errors_copy_id_and_opcode_and_never_answer_responses() {
        let mut q = Message::query();
        q.metadata.id = 0xbeef;
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(name("a.b."), RecordType::A));
        let bytes = q.to_vec().unwrap();
        let reply = Message::from_vec(&header_error(&bytes, ResponseCode::FormErr).unwrap()).unwrap();
        assert_eq!(reply.metadata.id, 0xbeef);
        assert_eq!(reply.metadata.message_type, MessageType::Response);
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        assert!(reply.metadata.recursion_desired);
        let mut response = bytes.clone();
        response[2] |= 0x80;
        assert!(header_error(&response, ResponseCode::FormErr).is_none());
        assert!(header_error(&bytes[..11], ResponseCode::FormErr).is_none());
    }

    #[test]
    fn oversized_udp_replies_are_truncated() {
        let mut q = Message::query();
        q.add_query(Query::query(name("big.example."), RecordType::A));
        let mut r = error_reply(&q, ResponseCode::NoError);
        for i in 0..60u8 {
            r.add_answer(Record::from_rdata(name("big.example."), 60, RData::A(A([10, 0, 0, i].into()))));
        }
        let udp = Message::from_vec(&encode(&r, Transport::Udp, &q).unwrap()).unwrap();
        assert!(udp.metadata.truncation);
        assert!(udp.answers.is_empty());
        let tcp = Message::from_vec(&encode(&r, Transport::Tcp, &q).unwrap()).unwrap();
        assert_eq!(tcp.answers.len(), 60);
    }

    /// An upstream that answers every query from memory with `answer` (its id and question set
    /// to the query's), and counts what it was asked.
    struct MemoryUpstream {
        answer: Option<Message>,
        asked: AtomicUsize,
    }

    impl Upstream for MemoryUpstream {
        fn forward(&self, query: &Message) -> impl Future<Output = Result<Message, UpstreamError>> + Send {
            self.asked.fetch_add(1, Relaxed);
            let answer = self.answer.clone().map(|mut answer| {
                answer.metadata.id = query.metadata.id;
                answer.metadata.message_type = MessageType::Response;
                answer.queries = query.queries.clone();
                answer
            });
            std::future::ready(answer.ok_or(UpstreamError::NoServers))
        }
    }

    fn web_policy(mode: Mode) -> DnsPolicy {
        let names = NameMatcher::new([(
            &HostPattern::parse("*.mirror.internal").unwrap(),
            Grant { proto: Proto::Any, ports: PortRange::ANY },
        )]);
        DnsPolicy::from_services([("web".to_owned(), ServicePolicy { mode, names })])
    }

    fn web() -> Attribution {
        Attribution {
            service: Arc::from("web"),
            cgroup_id: 1,
            pid: 2,
            comm: "curl".into(),
            original_server: "10.0.0.53:53".parse().unwrap(),
        }
    }

    /// An answerer for `web` in `mode` whose upstream answers `10.0.0.10` with `ttl`.
    fn answerer(mode: Mode, ttl: u32) -> Arc<Answerer<MemoryUpstream>> {
        let mut answer = Message::response(0, OpCode::Query);
        answer.add_answer(Record::from_rdata(name("a.mirror.internal."), ttl, RData::A(A([10, 0, 0, 10].into()))));
        answerer_with(mode, answer)
    }

    /// An answerer for `web` in `mode` whose upstream answers `answer`.
    fn answerer_with(mode: Mode, answer: Message) -> Arc<Answerer<MemoryUpstream>> {
        let upstream = MemoryUpstream { answer: Some(answer), asked: Default::default() };
        let allow = Arc::new(AllowSet::new(TtlBounds::default(), 16, |_: &AllowChange| {}));
        Arc::new(Answerer::new(AnswerSettings::default(), upstream, web_policy(mode), allow, |_: DnsEvent| {}))
    }

    /// The reply to `query` from `web` over `transport`.
    async fn reply_to(answerer: &Arc<Answerer<MemoryUpstream>>, query: &Message, transport: Transport) -> Vec<u8> {
        let (client, local) = ("127.0.0.1:40000".parse().unwrap(), "127.53.0.7:53".parse().unwrap());
        answerer.answer(&query.to_vec().unwrap(), Some(web()), client, local, transport).await.unwrap()
    }

    async fn ask(answerer: &Arc<Answerer<MemoryUpstream>>, qname: &str, who: Option<Attribution>) -> Message {
        let mut q = Message::query();
        q.metadata.id = 0x4242;
        q.add_query(Query::query(name(qname), RecordType::A));
        let (client, local) = ("127.0.0.1:40000".parse().unwrap(), "127.53.0.7:53".parse().unwrap());
        let reply = answerer.answer(&q.to_vec().unwrap(), who, client, local, Transport::Udp).await.unwrap();
        let reply = Message::from_vec(&reply).unwrap();
        assert_eq!((reply.metadata.id, &reply.queries), (0x4242, &q.queries));
        reply
    }

    #[tokio::test]
    async fn the_answerer_forwards_allowed_names_and_keeps_denied_ones_from_the_upstream() {
        let enforce = answerer(Mode::Enforce, 86_400);
        let reply = ask(&enforce, "a.mirror.internal.", Some(web())).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert_eq!(reply.answers.len(), 1);
        assert_eq!(reply.answers[0].ttl, TtlBounds::default().cap_secs(), "TTL not capped");
        assert_eq!(enforce.allow_set().len(), 1);
        assert_eq!(enforce.upstream().asked.load(Relaxed), 1);

        let reply = ask(&enforce, "evilmirror.internal.", Some(web())).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        let reply = ask(&enforce, "a.mirror.internal.", None).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        assert_eq!(enforce.upstream().asked.load(Relaxed), 1, "a refused name went upstream");
        assert_eq!(enforce.allow_set().len(), 1);

        // Audit: answered, reported, never admitted.
        let audit = answerer(Mode::Audit, 60);
        let reply = ask(&audit, "evilmirror.internal.", Some(web())).await;
        assert_eq!((reply.metadata.response_code, reply.answers.len()), (ResponseCode::NoError, 1));
        assert!(audit.allow_set().is_empty());
    }

    /// Found by the `dns_query` fuzz target: a query of 91 questions got a FORMERR echoing them
    /// all, 847 bytes to a client that accepts 512, truncation keeping the questions.
    #[tokio::test]
    async fn a_reply_that_does_not_fit_even_truncated_is_the_header_alone() {
        let answerer = answerer(Mode::Enforce, 60);
        let mut q = Message::query();
        q.metadata.id = 0x9191;
        for i in 0..91 {
            q.add_query(Query::query(name(&format!("host-{i}.a-rather-long-domain.mirror.internal.")), RecordType::A));
        }
        let bytes = reply_to(&answerer, &q, Transport::Udp).await;
        assert_eq!(bytes.len(), 12, "{} bytes", bytes.len());
        let reply = Message::from_vec(&bytes).unwrap();
        assert_eq!(reply.metadata.id, 0x9191);
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        assert!(reply.metadata.truncation);
        // Over TCP, it all fits.
        let reply = Message::from_vec(&reply_to(&answerer, &q, Transport::Tcp).await).unwrap();
        assert_eq!((reply.queries.len(), reply.metadata.truncation), (91, false));

        // Over TCP, beyond 16 bits: the header alone too.
        let mut big = error_reply(&q, ResponseCode::FormErr);
        for i in 0..1200 {
            big.add_query(Query::query(name(&format!("{}.n{i}.", "x".repeat(60))), RecordType::A));
        }
        let bytes = encode(&big, Transport::Tcp, &q).unwrap();
        assert_eq!(bytes.len(), 12);
    }

    /// Found by the `dns_query` fuzz target: the upstream's opcode reached the client.
    #[tokio::test]
    async fn replies_carry_the_query_s_opcode_and_recursion_desired() {
        let mut answer = Message::response(0, OpCode::Update);
        answer.metadata.recursion_desired = false;
        let answerer = answerer_with(Mode::Enforce, answer);
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(name("a.mirror.internal."), RecordType::A));
        let reply = Message::from_vec(&reply_to(&answerer, &q, Transport::Udp).await).unwrap();
        assert_eq!(reply.metadata.op_code, OpCode::Query);
        assert!(reply.metadata.recursion_desired);
    }

    /// EDNS is hop by hop: the client gets the proxy's OPT record (only if it sent one), never
    /// the upstream's options; a reply without them fits the client's 512 bytes.
    #[tokio::test]
    async fn replies_carry_the_proxy_s_edns_not_the_upstream_s() {
        let mut answer = Message::response(0, OpCode::Query);
        answer.add_answer(Record::from_rdata(name("a.mirror.internal."), 60, RData::A(A([10, 0, 0, 10].into()))));
        let mut upstream_edns = Edns::new();
        upstream_edns.set_max_payload(4096);
        upstream_edns.options_mut().insert(hickory_proto::rr::rdata::opt::EdnsOption::Unknown(3, vec![b'n'; 600]));
        answer.set_edns(upstream_edns);
        let answerer = answerer_with(Mode::Enforce, answer);

        let mut plain = Message::query();
        plain.add_query(Query::query(name("a.mirror.internal."), RecordType::A));
        let bytes = reply_to(&answerer, &plain, Transport::Udp).await;
        assert!(bytes.len() <= 512, "a {}-byte reply to a client that accepts 512", bytes.len());
        let reply = Message::from_vec(&bytes).unwrap();
        assert!(reply.edns.is_none(), "an OPT record for a client that sent none");
        assert_eq!(reply.answers.len(), 1);

        let mut with_edns = plain.clone();
        let mut edns = Edns::new();
        edns.set_max_payload(1400);
        edns.set_dnssec_ok(true);
        with_edns.set_edns(edns);
        let reply = Message::from_vec(&reply_to(&answerer, &with_edns, Transport::Udp).await).unwrap();
        let edns = reply.edns.expect("no OPT record for a client that sent one");
        assert_eq!(edns.max_payload(), 1232);
        assert!(edns.flags().dnssec_ok);
        assert!(edns.options().as_ref().is_empty(), "the upstream's options reached the client");

        // An extended code (BADCOOKIE, 23) cannot reach a client without EDNS as its low bits
        // (23 & 15 = YXDOMAIN): it gets SERVFAIL; one with EDNS gets the code.
        let mut answer = Message::response(0, OpCode::Query);
        answer.metadata.response_code = ResponseCode::BADCOOKIE;
        answer.set_edns(Edns::new());
        let answerer = answerer_with(Mode::Enforce, answer);
        let reply = Message::from_vec(&reply_to(&answerer, &plain, Transport::Udp).await).unwrap();
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        let reply = Message::from_vec(&reply_to(&answerer, &with_edns, Transport::Udp).await).unwrap();
        assert_eq!(reply.metadata.response_code, ResponseCode::BADCOOKIE);
    }

    /// A clock tests move by hand.
    #[derive(Clone)]
    struct ManualClock(Arc<std::sync::Mutex<std::time::Instant>>);

    impl ManualClock {
        fn new() -> ManualClock {
            ManualClock(Arc::new(std::sync::Mutex::new(std::time::Instant::now())))
        }
        fn now(&self) -> std::time::Instant {
            *self.0.lock().unwrap()
        }
        fn advance(&self, by: std::time::Duration) {
            *self.0.lock().unwrap() += by;
        }
        fn clock(&self) -> Clock {
            let me = self.clone();
            Arc::new(move || me.now())
        }
    }

    type Events = Arc<std::sync::Mutex<Vec<DnsEvent>>>;

    /// `web` (enforce) may resolve `*.mirror.internal`; `ci` (enforce) and `batch` (audit) only
    /// `pypi.org`.
    fn two_service_policy() -> DnsPolicy {
        let grant = Grant { proto: Proto::Any, ports: PortRange::ANY };
        let matcher = |pattern: &str| NameMatcher::new([(&HostPattern::parse(pattern).unwrap(), grant)]);
        DnsPolicy::from_services([
            ("web".to_owned(), ServicePolicy { mode: Mode::Enforce, names: matcher("*.mirror.internal") }),
            ("ci".to_owned(), ServicePolicy { mode: Mode::Enforce, names: matcher("pypi.org") }),
            ("batch".to_owned(), ServicePolicy { mode: Mode::Audit, names: matcher("pypi.org") }),
        ])
    }

    fn asker(service: &str, pid: u32) -> Attribution {
        Attribution { service: Arc::from(service), pid, ..web() }
    }

    /// An answerer over [`two_service_policy`] whose upstream answers `answer`, on `clock`,
    /// recording its events.
    fn cached_answerer(answer: Message, clock: &ManualClock) -> (Arc<Answerer<MemoryUpstream>>, Events) {
        let upstream = MemoryUpstream { answer: Some(answer), asked: Default::default() };
        let allow = Arc::new(AllowSet::new(TtlBounds::default(), 64, |_: &AllowChange| {}));
        let events: Events = Arc::default();
        let sink = {
            let events = Arc::clone(&events);
            move |e: DnsEvent| events.lock().unwrap().push(e)
        };
        let answerer = Answerer::new(AnswerSettings::default(), upstream, two_service_policy(), allow, sink)
            .with_clock(clock.clock());
        (Arc::new(answerer), events)
    }

    async fn ask_as(answerer: &Arc<Answerer<MemoryUpstream>>, id: u16, qname: &str, who: Attribution) -> Message {
        let mut q = Message::query();
        q.metadata.id = id;
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(name(qname), RecordType::A));
        let (client, local) = ("127.0.0.1:40000".parse().unwrap(), "127.53.0.7:53".parse().unwrap());
        let reply = answerer.answer(&q.to_vec().unwrap(), Some(who), client, local, Transport::Udp).await.unwrap();
        let reply = Message::from_vec(&reply).unwrap();
        assert_eq!(reply.metadata.id, id, "the reply's id is the asker's");
        assert_eq!(reply.queries, q.queries, "the reply echoes the asker's question");
        reply
    }

    fn a_record(ttl: u32) -> Message {
        let mut answer = Message::response(0, OpCode::Query);
        answer.add_answer(Record::from_rdata(name("a.mirror.internal."), ttl, RData::A(A([10, 0, 0, 10].into()))));
        answer
    }

    fn query_events(events: &Events) -> Vec<QueryEvent> {
        let events = events.lock().unwrap();
        events
            .iter()
            .filter_map(|e| match e {
                DnsEvent::Query(q) => Some(q.clone()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn cached_answers_age_and_expire_with_their_ttl() {
        let clock = ManualClock::new();
        let (answerer, _) = cached_answerer(a_record(60), &clock);
        let asked = || answerer.upstream().asked.load(Relaxed);

        let reply = ask_as(&answerer, 1, "a.mirror.internal.", asker("web", 1)).await;
        assert_eq!((reply.answers[0].ttl, asked()), (60, 1));
        clock.advance(std::time::Duration::from_millis(25_500));
        let reply = ask_as(&answerer, 2, "A.Mirror.Internal.", asker("web", 1)).await;
        assert_eq!(asked(), 1, "a hit went upstream");
        assert_eq!(reply.answers[0].ttl, 35, "the TTL lowered by the entry's age");
        clock.advance(std::time::Duration::from_millis(34_500));
        let reply = ask_as(&answerer, 3, "a.mirror.internal.", asker("web", 1)).await;
        assert_eq!(asked(), 2, "an expired entry was used");
        assert_eq!(reply.answers[0].ttl, 60);
        let stats = answerer.cache_stats();
        assert_eq!((stats.hits, stats.misses, stats.entries), (1, 2, 1));
    }

    #[tokio::test]
    async fn negative_answers_are_cached_until_the_soa_minimum() {
        let clock = ManualClock::new();
        let mut nx = Message::response(0, OpCode::Query);
        nx.metadata.response_code = ResponseCode::NXDomain;
        let soa = hickory_proto::rr::rdata::SOA::new(name("internal."), name("h.internal."), 1, 60, 60, 60, 30);
        nx.add_authority(Record::from_rdata(name("internal."), 600, RData::SOA(soa)));
        let (answerer, events) = cached_answerer(nx, &clock);
        let asked = || answerer.upstream().asked.load(Relaxed);

        let reply = ask_as(&answerer, 1, "gone.mirror.internal.", asker("web", 1)).await;
        assert_eq!((reply.metadata.response_code, asked()), (ResponseCode::NXDomain, 1));
        clock.advance(std::time::Duration::from_secs(29));
        let reply = ask_as(&answerer, 2, "gone.mirror.internal.", asker("web", 1)).await;
        assert_eq!((reply.metadata.response_code, asked()), (ResponseCode::NXDomain, 1));
        assert_eq!(reply.authorities[0].ttl, 1, "the SOA's TTL is what is left of the 30 s");
        clock.advance(std::time::Duration::from_secs(1));
        ask_as(&answerer, 3, "gone.mirror.internal.", asker("web", 1)).await;
        assert_eq!(asked(), 2, "the negative entry outlived the SOA minimum");
        let caches: Vec<CacheUse> = query_events(&events).iter().map(|e| e.cache).collect();
        assert_eq!(caches, [CacheUse::Miss, CacheUse::Hit, CacheUse::Miss]);

        // SERVFAIL is never kept.
        let mut fail = Message::response(0, OpCode::Query);
        fail.metadata.response_code = ResponseCode::ServFail;
        let (answerer, _) = cached_answerer(fail, &clock);
        ask_as(&answerer, 1, "a.mirror.internal.", asker("web", 1)).await;
        ask_as(&answerer, 2, "a.mirror.internal.", asker("web", 1)).await;
        assert_eq!(answerer.upstream().asked.load(Relaxed), 2);
    }

    /// A cached answer is judged per service and per query: `ci`, which may not resolve the
    /// name `web`'s answer is cached for, is refused and admits nothing; `batch` (audit) gets
    /// the answer and admits nothing; `web`'s second question, answered from the cache, admits
    /// the addresses for `web` for what is left of their TTL.
    #[tokio::test]
    async fn a_cached_answer_admits_only_for_the_service_that_may_resolve_it() {
        let clock = ManualClock::new();
        let (answerer, events) = cached_answerer(a_record(60), &clock);
        let allow = Arc::clone(answerer.allow_set());
        let t0 = clock.now();
        ask_as(&answerer, 1, "a.mirror.internal.", asker("web", 1)).await;
        assert_eq!(allow.live("web"), vec![("10.0.0.10".parse().unwrap(), t0 + std::time::Duration::from_secs(60))]);

        clock.advance(std::time::Duration::from_secs(5));
        let reply = ask_as(&answerer, 2, "a.mirror.internal.", asker("ci", 2)).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        assert!(reply.answers.is_empty());
        assert!(allow.live("ci").is_empty(), "a denied service admitted a cached answer");
        let reply = ask_as(&answerer, 3, "a.mirror.internal.", asker("batch", 3)).await;
        assert_eq!((reply.metadata.response_code, reply.answers.len()), (ResponseCode::NoError, 1));
        assert!(allow.live("batch").is_empty(), "audit admitted a cached answer");
        assert_eq!(answerer.upstream().asked.load(Relaxed), 1, "the audit answer came from the cache");

        // Let web's entry lapse, then ask again from the cache: admitted again, with 40 s left.
        clock.advance(std::time::Duration::from_secs(15));
        allow.sweep(t0 + std::time::Duration::from_secs(61));
        assert!(allow.live("web").is_empty());
        let t1 = clock.now();
        let reply = ask_as(&answerer, 4, "a.mirror.internal.", asker("web", 1)).await;
        assert_eq!(reply.answers[0].ttl, 40);
        assert_eq!(allow.live("web"), vec![("10.0.0.10".parse().unwrap(), t1 + std::time::Duration::from_secs(40))]);
        assert_eq!(answerer.upstream().asked.load(Relaxed), 1);

        let summary: Vec<(String, Verdict, CacheUse, usize)> = query_events(&events)
            .iter()
            .map(|e| (e.who.service.to_string(), e.verdict, e.cache, e.addrs.len()))
            .collect();
        assert_eq!(
            summary,
            [
                ("web".to_owned(), Verdict::Allowed, CacheUse::Miss, 1),
                ("ci".to_owned(), Verdict::Rejected, CacheUse::NotAsked, 0),
                ("batch".to_owned(), Verdict::WouldReject, CacheUse::Hit, 1),
                ("web".to_owned(), Verdict::Allowed, CacheUse::Hit, 1),
            ]
        );
    }

    /// A hit reports what a miss reports (asker, name, type, verdict, code, addresses), and
    /// hands the asker the same reply but for its own id and what is left of the TTLs.
    #[tokio::test]
    async fn a_hit_reports_and_replies_as_a_miss_does() {
        let clock = ManualClock::new();
        let (answerer, events) = cached_answerer(a_record(60), &clock);
        let miss = ask_as(&answerer, 0x1111, "a.mirror.internal.", asker("web", 7)).await;
        let hit = ask_as(&answerer, 0x2222, "a.mirror.internal.", asker("web", 7)).await;
        let mut expected = miss.clone();
        expected.metadata.id = 0x2222;
        assert_eq!(hit, expected);
        let mut events = query_events(&events);
        assert_eq!(events.len(), 2);
        assert_eq!((events[0].cache, events[1].cache), (CacheUse::Miss, CacheUse::Hit));
        for e in &mut events {
            e.elapsed = std::time::Duration::ZERO;
            e.cache = CacheUse::NotAsked;
        }
        assert_eq!(events[0], events[1]);
    }

    #[tokio::test]
    async fn a_cache_that_is_off_forwards_every_question() {
        let clock = ManualClock::new();
        let (answerer, _) = cached_answerer(a_record(60), &clock);
        let answerer =
            Arc::into_inner(answerer).unwrap().with_cache(CacheSettings { max_entries: 0, ..CacheSettings::default() });
        let answerer = Arc::new(answerer);
        ask_as(&answerer, 1, "a.mirror.internal.", asker("web", 1)).await;
        ask_as(&answerer, 2, "a.mirror.internal.", asker("web", 1)).await;
        assert_eq!(answerer.upstream().asked.load(Relaxed), 2);
    }
}
