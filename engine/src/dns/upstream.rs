//! Forwarding a query to the upstream servers: UDP from a pool of sockets per server (each
//! bound to a random source port, replaced after a number of queries or an age), a fresh random
//! transaction id per query, the reply matched to its query by id and question (anything else
//! that arrives is dropped), TCP when the reply is truncated, the servers tried in order within
//! one overall deadline. [`Upstream`] is the seam the answering code forwards through;
//! [`Servers`] is the proxy's.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hickory_proto::op::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

/// Largest DNS message over UDP the proxy accepts from upstream (EDNS payloads stay below).
pub(crate) const MAX_UDP: usize = 4096;

/// UDP sockets per upstream server; each query takes one at random.
const POOL_SIZE: usize = 4;
/// Queries a pooled socket carries before a fresh one (a new random source port) replaces it.
const MAX_USES: u32 = 256;
/// Age after which a pooled socket is replaced, however little it was used.
const MAX_AGE: Duration = Duration::from_secs(30);

/// Why forwarding failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// No upstream server is configured.
    #[error("no upstream server is configured")]
    NoServers,
    /// No server answered within the deadline.
    #[error("no upstream answered within {0:?}")]
    Timeout(Duration),
    /// Every server failed; the last error is kept.
    #[error("upstream `{server}` failed: {reason}")]
    Failed {
        /// The last server tried.
        server: SocketAddr,
        /// What went wrong there.
        reason: String,
    },
}

/// Where the answering code ([`Answerer`](super::Answerer)) sends the questions it may resolve.
/// [`Servers`] is the proxy's; tests and the fuzz targets answer from memory.
pub trait Upstream: Send + Sync + 'static {
    /// The answer to `query`: a response with the query's opcode and question, or why there is
    /// none.
    fn forward(&self, query: &Message) -> impl Future<Output = Result<Message, UpstreamError>> + Send;
}

/// Upstream servers over the network: UDP from a pool of sockets per server with a fresh id per
/// query, TCP when the reply is truncated, the servers tried in order within one overall
/// deadline.
#[derive(Debug, Clone)]
pub struct Servers {
    addrs: Vec<SocketAddr>,
    timeout: Duration,
    /// One pool per server, in the order of `addrs`.
    pools: Arc<[Pool]>,
}

impl PartialEq for Servers {
    fn eq(&self, other: &Servers) -> bool {
        self.addrs == other.addrs && self.timeout == other.timeout
    }
}

impl Eq for Servers {}

impl Servers {
    /// The servers at `addrs`, asked in order; `timeout` bounds the whole exchange. The sockets
    /// are opened on first use (inside a tokio runtime).
    pub fn new(addrs: Vec<SocketAddr>, timeout: Duration) -> Servers {
        let pools = addrs.iter().map(|&server| Pool::new(server)).collect();
        Servers { addrs, timeout, pools }
    }

    /// The servers, in the order they are asked.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }
}

impl Upstream for Servers {
    fn forward(&self, query: &Message) -> impl Future<Output = Result<Message, UpstreamError>> + Send {
        forward(&self.pools, query, self.timeout)
    }
}

/// The nameservers of a resolv.conf file (port 53), in order. IPv6 zone ids (`fe80::1%eth0`) are
/// dropped with the address. Missing file: empty.
pub fn resolv_conf_servers(path: &Path) -> io::Result<Vec<SocketAddr>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(parse_resolv_conf(&text))
}

/// The nameservers in resolv.conf text.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next().unwrap_or_default();
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next()).flatten()
        })
        .filter_map(|addr| addr.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// A 16-bit id nobody can predict: SipHash (keyed at random per process by the standard
/// library) of a counter.
pub(crate) fn random_id() -> u16 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> = std::sync::OnceLock::new();
    let mut hasher = KEYS.get_or_init(std::collections::hash_map::RandomState::new).build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    u16::try_from(hasher.finish() & 0xffff).unwrap_or(0)
}

/// Sends `query` to the servers in order until one answers, within `timeout` overall. The
/// answer is checked: same id, same question, a response.
async fn forward(servers: &[Pool], query: &Message, timeout: Duration) -> Result<Message, UpstreamError> {
    if servers.is_empty() {
        return Err(UpstreamError::NoServers);
    }
    let deadline = Instant::now() + timeout;
    let mut last = None;
    for (i, pool) in servers.iter().enumerate() {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        // Share what is left among the servers not tried yet.
        let left = u32::try_from(servers.len() - i).unwrap_or(1).max(1);
        let slice = (deadline - now) / left;
        match tokio::time::timeout(slice, ask(pool, query)).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(reason)) => last = Some(UpstreamError::Failed { server: pool.server, reason }),
            Err(_) => last = Some(UpstreamError::Timeout(timeout)),
        }
    }
    Err(last.unwrap_or(UpstreamError::Timeout(timeout)))
}

/// One server: UDP from its pool, then TCP (a fresh connection, a fresh id) if the reply is
/// truncated.
async fn ask(pool: &Pool, query: &Message) -> Result<Message, String> {
    let answer = pool.socket()?.ask(query).await?;
    if !answer.metadata.truncation {
        return Ok(answer);
    }
    let mut query = query.clone();
    query.metadata.id = random_id();
    let bytes = query.to_vec().map_err(|e| format!("encoding the query: {e}"))?;
    ask_tcp(pool.server, &bytes, &query).await
}

fn unspecified(server: SocketAddr) -> SocketAddr {
    match server {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

/// The UDP sockets of one server.
#[derive(Debug)]
struct Pool {
    server: SocketAddr,
    slots: Mutex<Vec<Option<Arc<Pooled>>>>,
}

impl Pool {
    fn new(server: SocketAddr) -> Pool {
        Pool { server, slots: Mutex::new(vec![None; POOL_SIZE]) }
    }

    /// A socket for one query: one of the pool's at random, replaced by a fresh one (a new
    /// random port) when it is missing, worn out (uses, age) or failed.
    fn socket(&self) -> Result<Arc<Pooled>, String> {
        let slot = usize::from(random_id()) % POOL_SIZE;
        let mut slots = self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = slots.get(slot).and_then(Option::as_ref).filter(|s| s.usable()).cloned();
        if let Some(socket) = current {
            return Ok(socket);
        }
        let fresh = Arc::new(Pooled::open(self.server).map_err(|e| e.to_string())?);
        if let Some(place) = slots.get_mut(slot) {
            *place = Some(Arc::clone(&fresh));
        }
        Ok(fresh)
    }
}

/// What a pooled socket's receive task shares with its askers.
#[derive(Debug)]
struct Shared {
    socket: UdpSocket,
    /// The queries waiting for their answer, by id.
    pending: Mutex<HashMap<u16, Waiter>>,
    /// Told when the socket is retired and its last asker is done.
    stop: Notify,
    /// A receive failed (ICMP unreachable and the like): no new queries on this socket.
    failed: AtomicBool,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, HashMap<u16, Waiter>> {
        // Every update is one insert or remove: a poisoned lock is still consistent.
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One query waiting on a pooled socket.
#[derive(Debug)]
struct Waiter {
    /// What it asked (id and question), to match the answer against.
    query: Message,
    /// Which ask this is (ids are reused).
    ticket: u64,
    answer: oneshot::Sender<Result<Message, String>>,
}

/// A UDP socket connected to one server (the kernel drops datagrams from anyone else; an ICMP
/// port unreachable fails the receive at once), with a task receiving its datagrams and handing
/// each to the query it answers. Dropped by the pool and the last asker: the task stops.
#[derive(Debug)]
struct Pooled {
    shared: Arc<Shared>,
    uses: AtomicU32,
    opened: Instant,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.shared.stop.notify_one();
    }
}

impl Pooled {
    fn open(server: SocketAddr) -> io::Result<Pooled> {
        let socket = std::net::UdpSocket::bind(unspecified(server))?;
        socket.connect(server)?;
        socket.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            socket: UdpSocket::from_std(socket)?,
            pending: Mutex::new(HashMap::new()),
            stop: Notify::new(),
            failed: AtomicBool::new(false),
        });
        tokio::spawn(receive(Arc::clone(&shared)));
        Ok(Pooled { shared, uses: AtomicU32::new(0), opened: Instant::now() })
    }

    fn usable(&self) -> bool {
        !self.shared.failed.load(Ordering::Relaxed)
            && self.uses.load(Ordering::Relaxed) < MAX_USES
            && self.opened.elapsed() < MAX_AGE
    }

    /// Sends `query` with a fresh random id (one no other query on this socket is waiting
    /// with) and waits for its answer.
    async fn ask(&self, query: &Message) -> Result<Message, String> {
        static TICKETS: AtomicU64 = AtomicU64::new(0);
        self.uses.fetch_add(1, Ordering::Relaxed);
        let mut query = query.clone();
        let ticket = TICKETS.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let bytes = {
            let mut pending = self.shared.pending();
            let id = (0..64).map(|_| random_id()).find(|id| !pending.contains_key(id));
            let id = id.ok_or_else(|| "no free query id on the upstream socket".to_owned())?;
            query.metadata.id = id;
            let bytes = query.to_vec().map_err(|e| format!("encoding the query: {e}"))?;
            pending.insert(id, Waiter { query, ticket, answer: tx });
            (id, bytes)
        };
        let (id, bytes) = bytes;
        // However this ends (answer, failure, the caller's timeout), the query stops waiting.
        let _waiting = Waiting { shared: &self.shared, id, ticket };
        self.shared.socket.send(&bytes).await.map_err(|e| e.to_string())?;
        rx.await.map_err(|_| "the upstream socket closed".to_owned())?
    }
}

/// Removes a query from its socket's waiters when it stops waiting (unless an answer already
/// did, and another query took the id since).
struct Waiting<'a> {
    shared: &'a Shared,
    id: u16,
    ticket: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut pending = self.shared.pending();
        if pending.get(&self.id).is_some_and(|w| w.ticket == self.ticket) {
            pending.remove(&self.id);
        }
    }
}

/// A pooled socket's receiver: each datagram that is the answer to a waiting query (same id,
/// a response, same opcode and question: [`answers`]) goes to it; anything else (late, spoofed,
/// mismatched, garbage) is dropped and the query goes on waiting. A failed receive (ICMP
/// unreachable) fails every waiting query at once and retires the socket.
async fn receive(shared: Arc<Shared>) {
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let received = tokio::select! {
            r = shared.socket.recv(&mut buf) => r,
            () = shared.stop.notified() => return,
        };
        match received {
            Ok(n) => {
                let Some(answer) = buf.get(..n).and_then(|d| Message::from_vec(d).ok()) else { continue };
                let mut pending = shared.pending();
                let id = answer.metadata.id;
                if pending.get(&id).is_some_and(|w| answers(&answer, &w.query))
                    && let Some(waiter) = pending.remove(&id)
                {
                    let _ = waiter.answer.send(Ok(answer));
                }
            }
            Err(e) => {
                shared.failed.store(true, Ordering::Relaxed);
                let reason = e.to_string();
                for (_, waiter) in shared.pending().drain() {
                    let _ = waiter.answer.send(Err(reason.clone()));
                }
            }
        }
    }
}

async fn ask_tcp(server: SocketAddr, bytes: &[u8], query: &Message) -> Result<Message, String> {
    let mut stream = TcpStream::connect(server).await.map_err(|e| e.to_string())?;
    let len = u16::try_from(bytes.len()).map_err(|_| "query too long for TCP".to_owned())?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await.map_err(|e| e.to_string())?;
    loop {
        let len = stream.read_u16().await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; usize::from(len)];
        stream.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        if let Some(answer) = Message::from_vec(&buf).ok().filter(|a| answers(a, query)) {
            return Ok(answer);
        }
    }
}

/// True when `answer` is the response to `query`: same id, a response, the same opcode (what a
/// message may hold depends on it: an UPDATE's records may be empty, a QUERY's may not) and
/// the same question.
fn answers(answer: &Message, query: &Message) -> bool {
    answer.metadata.id == query.metadata.id
        && answer.metadata.message_type == hickory_proto::op::MessageType::Response
        && answer.metadata.op_code == query.metadata.op_code
        && answer.queries.len() == query.queries.len()
        && answer.queries.iter().zip(&query.queries).all(|(a, q)| {
            a.query_type == q.query_type
                && a.query_class == q.query_class
                && a.name.to_ascii().eq_ignore_ascii_case(&q.name.to_ascii())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_in_order() {
        let text = "# generated\nsearch example.com\nnameserver 10.0.0.2\nnameserver  fd00::53 # v6\n\
                    nameserver fe80::1%eth0\n; nameserver 10.9.9.9\noptions ndots:2\nnameserver bogus\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().unwrap_or_else(|_| unreachable!()),
                "[fd00::53]:53".parse().unwrap_or_else(|_| unreachable!())
            ]
        );
        assert!(parse_resolv_conf("").is_empty());
    }

    /// Found by the `dns_query` fuzz target: an UPDATE response (whose records may be empty) was
    /// taken as the answer to a QUERY, and the client got a reply it could not decode.
    #[test]
    fn an_answer_has_the_query_s_id_opcode_and_question() {
        use hickory_proto::op::{MessageType, OpCode, Query};
        use hickory_proto::rr::{Name, RecordType};
        let mut query = Message::query();
        query.metadata.id = 7;
        let name = Name::from_ascii("A.Mirror.Internal.").unwrap_or_else(|_| unreachable!());
        query.add_query(Query::query(name, RecordType::A));
        let mut answer = Message::response(7, OpCode::Query);
        let lower = Name::from_ascii("a.mirror.internal.").unwrap_or_else(|_| unreachable!());
        answer.add_query(Query::query(lower, RecordType::A));
        assert!(answers(&answer, &query));
        let changed: [fn(&mut Message); 4] = [
            |m| m.metadata.id = 8,
            |m| m.metadata.message_type = MessageType::Query,
            |m| m.metadata.op_code = OpCode::Update,
            |m| m.queries.clear(),
        ];
        for change in changed {
            let mut other = answer.clone();
            change(&mut other);
            assert!(!answers(&other, &query), "{other:?}");
        }
    }

    #[test]
    fn ids_vary() {
        let ids: std::collections::HashSet<u16> = (0..1000).map(|_| random_id()).collect();
        assert!(ids.len() > 950, "only {} distinct ids in 1000", ids.len());
    }

    /// A server that answers every query first with what is not its answer (another id; the
    /// same id and another question; the same id as a query, not a response; garbage), then
    /// with the answer; it records the source port and id of each query.
    async fn decoy_server() -> (SocketAddr, Arc<Mutex<Vec<(u16, u16)>>>, tokio::task::JoinHandle<()>) {
        use hickory_proto::op::{OpCode, Query};
        use hickory_proto::rr::rdata::A;
        use hickory_proto::rr::{Name, RData, Record, RecordType};
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = socket.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else { continue };
                let Some(query) = buf.get(..n).and_then(|b| Message::from_vec(b).ok()) else { continue };
                let id = query.metadata.id;
                log.lock().unwrap_or_else(|e| panic!("{e}")).push((from.port(), id));
                let answer = |id: u16, qname: &Name, addr: [u8; 4]| {
                    let mut m = Message::response(id, OpCode::Query);
                    m.add_query(Query::query(qname.clone(), RecordType::A));
                    m.add_answer(Record::from_rdata(qname.clone(), 60, RData::A(A(addr.into()))));
                    m.to_vec().unwrap_or_else(|e| panic!("{e}"))
                };
                let Some(asked) = query.queries.first().map(|q| q.name.clone()) else { continue };
                let other = Name::from_ascii("other.example.").unwrap_or_else(|e| panic!("{e}"));
                let mut not_a_response =
                    Message::from_vec(&answer(id, &asked, [6, 6, 6, 6])).unwrap_or_else(|e| panic!("{e}"));
                not_a_response.metadata.message_type = hickory_proto::op::MessageType::Query;
                let decoys = [
                    answer(id.wrapping_add(1), &asked, [6, 6, 6, 1]),
                    answer(id, &other, [6, 6, 6, 2]),
                    not_a_response.to_vec().unwrap_or_else(|e| panic!("{e}")),
                    vec![0xde, 0xad, 0xbe, 0xef],
                    answer(id, &asked, [10, 9, 9, 9]),
                ];
                for datagram in decoys {
                    let _ = socket.send_to(&datagram, from).await;
                }
            }
        });
        (addr, seen, task)
    }

    #[tokio::test]
    async fn pooled_sockets_drop_what_is_not_the_answer_and_are_reused() {
        use hickory_proto::op::Query;
        use hickory_proto::rr::{Name, RData, RecordType};
        let (server, seen, task) = decoy_server().await;
        let servers = Servers::new(vec![server], Duration::from_secs(2));
        for i in 0..40 {
            let mut query = Message::query();
            query.metadata.id = 7;
            let name = Name::from_ascii(format!("q{i}.mirror.internal.")).unwrap_or_else(|e| panic!("{e}"));
            query.add_query(Query::query(name, RecordType::A));
            let answer = servers.forward(&query).await.unwrap_or_else(|e| panic!("query {i}: {e}"));
            let addrs: Vec<_> = answer.answers.iter().map(|r| r.data.clone()).collect();
            assert_eq!(addrs, vec![RData::A(hickory_proto::rr::rdata::A([10, 9, 9, 9].into()))], "query {i}");
            assert_eq!(answer.queries, query.queries);
        }
        let seen = seen.lock().unwrap_or_else(|e| panic!("{e}")).clone();
        task.abort();
        let ports: std::collections::HashSet<u16> = seen.iter().map(|(port, _)| *port).collect();
        let ids: std::collections::HashSet<u16> = seen.iter().map(|(_, id)| *id).collect();
        assert_eq!(seen.len(), 40);
        assert!(ports.len() <= POOL_SIZE, "{} source ports for 40 queries: sockets not reused", ports.len());
        assert!(ids.len() >= 38, "ids repeat: {} distinct of 40", ids.len());
        assert!(!ids.contains(&7), "the asker's id went upstream");
    }

    /// Concurrent queries on the same sockets each get their own answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_queries_on_pooled_sockets_are_not_mixed_up() {
        use hickory_proto::op::Query;
        use hickory_proto::rr::{Name, RecordType};
        let (server, _, task) = decoy_server().await;
        let servers = Servers::new(vec![server], Duration::from_secs(2));
        let mut running = tokio::task::JoinSet::new();
        for i in 0..200 {
            let servers = servers.clone();
            running.spawn(async move {
                let mut query = Message::query();
                let name = Name::from_ascii(format!("c{i}.mirror.internal.")).unwrap_or_else(|e| panic!("{e}"));
                query.add_query(Query::query(name, RecordType::A));
                let answer = servers.forward(&query).await.unwrap_or_else(|e| panic!("query {i}: {e}"));
                assert_eq!(answer.queries, query.queries);
            });
        }
        while let Some(done) = running.join_next().await {
            done.unwrap_or_else(|e| panic!("{e}"));
        }
        task.abort();
    }
}
