//! The proxy: UDP and TCP listeners on loopback (IPv4 and IPv6), one decision per question.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::RData;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex as AsyncMutex, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::allow::{AllowSet, SharedAddress};
use super::attrib::{Attribution, Attributor, Transport};
use super::names::DnsPolicy;
use super::socket::{PktUdp, tcp_listener};
use super::upstream::{self, MAX_UDP, UpstreamError};
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

/// How the proxy runs. Validated by [`Proxy::bind`].
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Port of every listener (UDP and TCP, IPv4 and IPv6); 0 picks one port free for all.
    pub port: u16,
    /// Listen on `0.0.0.0` (every `127.x.y.z` once bound to `lo`).
    pub ipv4: bool,
    /// Listen on `[::]`.
    pub ipv6: bool,
    /// Device the listeners are bound to (`SO_BINDTODEVICE`); `lo` keeps the wildcard-bound
    /// listeners loopback only. None binds to no device (then the proxy is reachable from the
    /// network: do not).
    pub device: Option<String>,
    /// Upstream servers, tried in order. Empty: the nameservers of [`ProxyConfig::resolv_conf`].
    pub upstreams: Vec<SocketAddr>,
    /// Where the default upstreams come from.
    pub resolv_conf: PathBuf,
    /// Overall time to get an upstream answer; then the client gets `SERVFAIL`. Keep it well
    /// below the clients' retry timeout (glibc: 5 s).
    pub upstream_timeout: Duration,
    /// The answer to a denied name in enforce.
    pub deny: DenyResponse,
    /// What to do with unattributed queries.
    pub unattributed: Unattributed,
    /// In enforce, also resolve denied names in the background (the client still gets the deny
    /// answer) to find addresses they share with allowed names. Off by default: it sends
    /// denied names upstream, which enforce otherwise never does.
    pub probe_denied: bool,
    /// Queries handled at once; beyond it a query gets `SERVFAIL` at once.
    pub max_in_flight: usize,
    /// TCP connections at once; beyond it a connection is closed at once.
    pub max_tcp_connections: usize,
    /// A TCP connection that sends no query for this long is closed (once its answers are
    /// out).
    pub tcp_idle_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            port: 0,
            ipv4: true,
            ipv6: true,
            device: Some("lo".to_owned()),
            upstreams: Vec::new(),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            upstream_timeout: Duration::from_millis(1500),
            deny: DenyResponse::Refused,
            unattributed: Unattributed::Refuse,
            probe_denied: false,
            max_in_flight: 4096,
            max_tcp_connections: 256,
            tcp_idle_timeout: Duration::from_secs(10),
        }
    }
}

/// Setting the proxy up failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// A listener could not be bound.
    #[error("cannot bind the dns proxy's {transport} listener to `{addr}`: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// `udp` or `tcp`.
        transport: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// No port was free for every listener.
    #[error("found no port free for every dns proxy listener after {0} tries")]
    NoFreePort(u32),
    /// resolv.conf could not be read.
    #[error("cannot read `{path}`: {source}")]
    ResolvConf {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No upstream server: none configured and none in resolv.conf.
    #[error("no upstream dns server: none configured and `{0}` lists no nameserver")]
    NoUpstream(PathBuf),
    /// An upstream is the proxy itself (queries would loop).
    #[error("upstream `{0}` is the dns proxy itself")]
    UpstreamIsProxy(SocketAddr),
    /// Neither IPv4 nor IPv6 is enabled.
    #[error("the dns proxy listens on no address family (enable ipv4 or ipv6)")]
    NoFamily,
}

/// One question and what the proxy did with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryEvent {
    /// Who asked.
    pub who: Attribution,
    /// The name asked, lowercase, without a final dot.
    pub name: String,
    /// The record type asked (`A`, `AAAA`, …).
    pub qtype: String,
    /// How it came.
    pub transport: Transport,
    /// The asker's mode.
    pub mode: Mode,
    /// `Allowed` (forwarded), `WouldReject` (audit: forwarded anyway) or `Rejected` (enforce:
    /// answered with the deny response).
    pub verdict: Verdict,
    /// The response code the client got.
    pub rcode: String,
    /// The addresses answered for the name (the end of any CNAME chain).
    pub addrs: Vec<IpAddr>,
    /// Why the client got `SERVFAIL`, when the upstream failed.
    pub upstream_error: Option<UpstreamError>,
    /// From receipt to reply.
    pub elapsed: Duration,
}

/// What the proxy reports (the agent turns these into metrics and the event log).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DnsEvent {
    /// An attributed question was answered.
    Query(QueryEvent),
    /// A question nobody could be attributed to (or attributed to a service the policy does not
    /// know).
    Unattributed {
        /// Client address.
        client: SocketAddr,
        /// The proxy address it was sent to.
        local: SocketAddr,
        /// The service named by the attributor, if any.
        service: Option<Arc<str>>,
        /// The name asked.
        name: String,
        /// How it came.
        transport: Transport,
        /// True when forwarded ([`Unattributed::Forward`]), false when refused.
        forwarded: bool,
    },
    /// An allowed and a denied name share an address.
    SharedAddress(SharedAddress),
    /// The allow set is full: these answered addresses were not admitted.
    AllowSetFull {
        /// The service.
        service: Arc<str>,
        /// The name.
        name: String,
        /// The addresses left out.
        addrs: Vec<IpAddr>,
    },
    /// A message that is not a well-formed query (answered `FORMERR`/`NOTIMP` when possible).
    Malformed {
        /// Client address.
        client: SocketAddr,
        /// How it came.
        transport: Transport,
        /// What is wrong.
        reason: String,
    },
    /// Too many queries in flight: one was answered `SERVFAIL` at once.
    Overloaded {
        /// Client address.
        client: SocketAddr,
    },
}

/// Where events go. Called from the proxy's tasks; keep it quick (count, or send on a channel).
pub trait EventSink: Send + Sync {
    /// One event.
    fn event(&self, event: DnsEvent);
}

impl<F: Fn(DnsEvent) + Send + Sync> EventSink for F {
    fn event(&self, event: DnsEvent) {
        self(event);
    }
}

struct Inner {
    config: ProxyConfig,
    upstreams: Vec<SocketAddr>,
    policy: ArcSwap<DnsPolicy>,
    attributor: Arc<dyn Attributor>,
    allow: Arc<AllowSet>,
    events: Box<dyn EventSink>,
    in_flight: Arc<Semaphore>,
}

/// A running DNS proxy. Dropping it (or [`Proxy::shutdown`]) stops every listener and task;
/// the allow set lives on with its owner.
pub struct Proxy {
    inner: Arc<Inner>,
    port: u16,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("port", &self.port).field("upstreams", &self.inner.upstreams).finish()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The listeners of one bind attempt.
struct Listeners {
    udp: Vec<PktUdp>,
    tcp: Vec<tokio::net::TcpListener>,
    port: u16,
}

fn bind_all(config: &ProxyConfig, port: u16) -> Result<Listeners, DnsError> {
    let mut families = Vec::new();
    if config.ipv4 {
        families.push(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }
    if config.ipv6 {
        families.push(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    }
    let device = config.device.as_deref();
    let mut out = Listeners { udp: Vec::new(), tcp: Vec::new(), port };
    for ip in families {
        let addr = SocketAddr::new(ip, out.port);
        let udp = PktUdp::bind(addr, device).map_err(|source| DnsError::Bind { addr, transport: "udp", source })?;
        out.port = udp.port();
        let addr = SocketAddr::new(ip, out.port);
        let tcp = tcp_listener(addr, device).map_err(|source| DnsError::Bind { addr, transport: "tcp", source })?;
        out.udp.push(udp);
        out.tcp.push(tcp);
    }
    Ok(out)
}

impl Proxy {
    /// Validates `config`, binds every listener and starts serving: each question is attributed
    /// by `attributor`, judged by `policy`, and the addresses of allowed names enter `allow`.
    /// Events go to `events`. Must run inside a tokio runtime. Binding to a device needs
    /// `CAP_NET_RAW` on kernels before 5.7.
    ///
    /// The sweeper of `allow` is not started here: the allow set's owner runs
    /// [`AllowSet::run_sweeper`].
    pub async fn bind(
        config: ProxyConfig,
        policy: DnsPolicy,
        attributor: Arc<dyn Attributor>,
        allow: Arc<AllowSet>,
        events: impl EventSink + 'static,
    ) -> Result<Proxy, DnsError> {
        if !config.ipv4 && !config.ipv6 {
            return Err(DnsError::NoFamily);
        }
        let upstreams = if config.upstreams.is_empty() {
            upstream::resolv_conf_servers(&config.resolv_conf)
                .map_err(|source| DnsError::ResolvConf { path: config.resolv_conf.clone(), source })?
        } else {
            config.upstreams.clone()
        };
        if upstreams.is_empty() {
            return Err(DnsError::NoUpstream(config.resolv_conf.clone()));
        }
        const TRIES: u32 = 32;
        let listeners = if config.port != 0 {
            bind_all(&config, config.port)?
        } else {
            let mut found = None;
            for _ in 0..TRIES {
                match bind_all(&config, 0) {
                    Ok(l) => {
                        found = Some(l);
                        break;
                    }
                    Err(DnsError::Bind { source, .. }) if source.kind() == std::io::ErrorKind::AddrInUse => {}
                    Err(e) => return Err(e),
                }
            }
            found.ok_or(DnsError::NoFreePort(TRIES))?
        };
        let port = listeners.port;
        if let Some(own) = upstreams.iter().find(|u| u.port() == port && u.ip().is_loopback()) {
            return Err(DnsError::UpstreamIsProxy(*own));
        }
        let inner = Arc::new(Inner {
            in_flight: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            config,
            upstreams,
            policy: ArcSwap::from_pointee(policy),
            attributor,
            allow,
            events: Box::new(events),
        });
        let mut tasks = Vec::new();
        for udp in listeners.udp {
            tasks.push(tokio::spawn(serve_udp(Arc::clone(&inner), Arc::new(udp))));
        }
        let tcp_slots = Arc::new(Semaphore::new(inner.config.max_tcp_connections.max(1)));
        for tcp in listeners.tcp {
            tasks.push(tokio::spawn(serve_tcp(Arc::clone(&inner), tcp, Arc::clone(&tcp_slots))));
        }
        Ok(Proxy { inner, port, tasks })
    }

    /// The port every listener is bound to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The upstream servers in use.
    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.inner.upstreams
    }

    /// The allow set the proxy feeds.
    pub fn allow_set(&self) -> &Arc<AllowSet> {
        &self.inner.allow
    }

    /// Replaces the policy; queries received from now on are judged by it. Allow-set entries
    /// admitted under the old one stay until they expire (at most the TTL cap).
    pub fn set_policy(&self, policy: DnsPolicy) {
        self.inner.policy.store(Arc::new(policy));
    }

    /// Stops every listener and connection task.
    pub async fn shutdown(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}

async fn serve_udp(inner: Arc<Inner>, socket: Arc<PktUdp>) {
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let datagram = match socket.recv(&mut buf).await {
            Ok(d) => d,
            // Transient (ENOMEM, a datagram without packet info); the next one may be fine.
            Err(_) => continue,
        };
        let Some(bytes) = buf.get(..datagram.len).map(<[u8]>::to_vec) else { continue };
        let Ok(permit) = Arc::clone(&inner.in_flight).try_acquire_owned() else {
            inner.events.event(DnsEvent::Overloaded { client: datagram.client });
            if let Some(reply) = header_error(&bytes, ResponseCode::ServFail) {
                let _ = socket.send(&reply, datagram.client, datagram.local.ip()).await;
            }
            continue;
        };
        let inner = Arc::clone(&inner);
        let socket = Arc::clone(&socket);
        tokio::spawn(async move {
            let _permit = permit;
            let who = inner.attributor.attribute(datagram.client, datagram.local, Transport::Udp);
            if let Some(reply) = inner.handle(&bytes, who, datagram.client, datagram.local, Transport::Udp).await {
                // The client may be gone; nothing to do about it.
                let _ = socket.send(&reply, datagram.client, datagram.local.ip()).await;
            }
        });
    }
}

async fn serve_tcp(inner: Arc<Inner>, listener: tokio::net::TcpListener, slots: Arc<Semaphore>) {
    loop {
        let Ok((stream, client)) = listener.accept().await else {
            // EMFILE and friends: back off briefly instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            drop(stream);
            inner.events.event(DnsEvent::Overloaded { client });
            continue;
        };
        let inner = Arc::clone(&inner);
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(inner, stream, client).await;
        });
    }
}

/// Queries a TCP client may have in flight at once (RFC 7766 pipelining).
const TCP_PIPELINE: usize = 32;

async fn serve_connection(inner: Arc<Inner>, stream: TcpStream, client: SocketAddr) {
    let Ok(local) = stream.local_addr() else { return };
    let _ = stream.set_nodelay(true);
    let who = inner.attributor.attribute(client, local, Transport::Tcp);
    let (mut reader, writer) = stream.into_split();
    let writer = Arc::new(AsyncMutex::new(writer));
    let mut running = JoinSet::new();
    // The reads are never raced against anything but the idle timeout (after which the
    // connection closes anyway): a length prefix read halfway would desynchronise the stream.
    let pipeline = Arc::new(Semaphore::new(TCP_PIPELINE));
    loop {
        while running.try_join_next().is_some() {}
        let Ok(permit) = Arc::clone(&pipeline).acquire_owned().await else { break };
        let read = async {
            let len = reader.read_u16().await?;
            let mut buf = vec![0u8; usize::from(len)];
            reader.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };
        let bytes = match tokio::time::timeout(inner.config.tcp_idle_timeout, read).await {
            Ok(Ok(bytes)) => bytes,
            _ => break,
        };
        let inner = Arc::clone(&inner);
        let writer = Arc::clone(&writer);
        let who = who.clone();
        running.spawn(async move {
            let _permit = permit;
            let Some(reply) = inner.handle(&bytes, who, client, local, Transport::Tcp).await else { return };
            let Ok(len) = u16::try_from(reply.len()) else { return };
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&reply);
            let _ = writer.lock().await.write_all(&framed).await;
        });
    }
    // The client closed its side (or went idle): finish what it asked, then close.
    while running.join_next().await.is_some() {}
    let _ = writer.lock().await.shutdown().await;
}

/// A reply with only a header: the query's id and opcode, `rcode`, no sections. None when the
/// bytes are not even a header, or are a response (never answer a response: no loops).
fn header_error(bytes: &[u8], rcode: ResponseCode) -> Option<Vec<u8>> {
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
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        reply.set_edns(edns);
    }
    reply
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

impl Inner {
    /// Answers one message; None when nothing should be sent back.
    async fn handle(
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
            let forwarded = self.config.unattributed == Unattributed::Forward;
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
            let reply = match upstream::forward(&self.upstreams, &query, self.config.upstream_timeout).await {
                Ok(answer) => self.client_reply(answer, &query),
                Err(_) => error_reply(&query, ResponseCode::ServFail),
            };
            return encode(&reply, transport, &query);
        };
        let who = who.clone();

        let grants = service.names.grants(&name);
        let verdict = crate::verdict::decide(service.mode, !grants.is_empty());
        let report = |reply: &Message, addrs: Vec<IpAddr>, upstream_error: Option<UpstreamError>| {
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
                elapsed: started.elapsed(),
            }));
        };

        if verdict == Verdict::Rejected {
            let rcode = match self.config.deny {
                DenyResponse::Refused => ResponseCode::Refused,
                DenyResponse::NxDomain => ResponseCode::NXDomain,
            };
            let reply = error_reply(&query, rcode);
            report(&reply, Vec::new(), None);
            if self.config.probe_denied {
                let inner = Arc::clone(self);
                let (query, service_name, names, name) =
                    (query.clone(), Arc::clone(&who.service), service.clone(), name.clone());
                tokio::spawn(async move {
                    if let Ok(answer) = upstream::forward(&inner.upstreams, &query, inner.config.upstream_timeout).await
                    {
                        let addrs = chain_addrs(&answer, &name);
                        inner.observe(&service_name, &names.names, &name, &addrs);
                    }
                });
            }
            return encode(&reply, transport, &query);
        }

        let answer = match upstream::forward(&self.upstreams, &query, self.config.upstream_timeout).await {
            Ok(answer) => answer,
            Err(e) => {
                let reply = error_reply(&query, ResponseCode::ServFail);
                report(&reply, Vec::new(), Some(e));
                return encode(&reply, transport, &query);
            }
        };
        let addrs = chain_addrs(&answer, &name);
        if service.mode != Mode::Off && !addrs.is_empty() {
            if !grants.is_empty() {
                // Admitted (and the sink told) before the client sees the answer.
                let admitted = self.allow.admit(&who.service, &grants, &addrs, super::now());
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
        report(&reply, addrs.iter().map(|(a, _)| *a).collect(), None);
        encode(&reply, transport, &query)
    }

    fn observe(&self, service: &Arc<str>, names: &super::names::NameMatcher, name: &str, addrs: &[(IpAddr, u32)]) {
        for conflict in self.allow.observe(service, names, name, addrs, super::now()) {
            self.events.event(DnsEvent::SharedAddress(conflict));
        }
    }

    /// The upstream answer as the client gets it: its id and question, TTLs at most the cap.
    fn client_reply(&self, mut answer: Message, query: &Message) -> Message {
        answer.metadata.id = query.metadata.id;
        answer.queries = query.queries.clone();
        let cap = self.allow.bounds().cap_secs();
        for record in
            answer.answers.iter_mut().chain(answer.authorities.iter_mut()).chain(answer.additionals.iter_mut())
        {
            record.ttl = record.ttl.min(cap);
        }
        answer
    }
}

/// Encodes a reply; over UDP, one larger than the client accepts is truncated (TC set, no
/// records) so the client retries over TCP.
fn encode(reply: &Message, transport: Transport, query: &Message) -> Option<Vec<u8>> {
    let bytes = reply.to_vec().ok()?;
    let limit = usize::from(query.max_payload());
    if transport == Transport::Udp && bytes.len() > limit {
        return reply.truncate().to_vec().ok();
    }
    Some(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]

    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use hickory_proto::rr::{Name, Record, RecordType};

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
}
