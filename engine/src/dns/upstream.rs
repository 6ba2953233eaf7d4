//! Forwarding a query to the upstream servers: UDP from a fresh socket (a random source port)
//! with a fresh random transaction id, the reply checked against both and against the question,
//! TCP when the reply is truncated, the servers tried in order within one overall deadline.
//! [`Upstream`] is the seam the answering code forwards through; [`Servers`] is the proxy's.

use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hickory_proto::op::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;

/// Largest DNS message over UDP the proxy accepts from upstream (EDNS payloads stay below).
pub(crate) const MAX_UDP: usize = 4096;

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

/// Upstream servers over the network: UDP from a fresh socket and a fresh id, TCP when the reply
/// is truncated, the servers tried in order within one overall deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Servers {
    addrs: Vec<SocketAddr>,
    timeout: Duration,
}

impl Servers {
    /// The servers at `addrs`, asked in order; `timeout` bounds the whole exchange.
    pub fn new(addrs: Vec<SocketAddr>, timeout: Duration) -> Servers {
        Servers { addrs, timeout }
    }

    /// The servers, in the order they are asked.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }
}

impl Upstream for Servers {
    fn forward(&self, query: &Message) -> impl Future<Output = Result<Message, UpstreamError>> + Send {
        forward(&self.addrs, query, self.timeout)
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

/// Sends `query` (already encoded with its id set to `id`) to the servers in order until one
/// answers, within `timeout` overall. The answer is checked: same id, same question, a response.
async fn forward(servers: &[SocketAddr], query: &Message, timeout: Duration) -> Result<Message, UpstreamError> {
    if servers.is_empty() {
        return Err(UpstreamError::NoServers);
    }
    let deadline = Instant::now() + timeout;
    let mut last = None;
    for (i, server) in servers.iter().enumerate() {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        // Share what is left among the servers not tried yet.
        let left = u32::try_from(servers.len() - i).unwrap_or(1).max(1);
        let slice = (deadline - now) / left;
        match tokio::time::timeout(slice, ask(*server, query)).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(reason)) => last = Some(UpstreamError::Failed { server: *server, reason }),
            Err(_) => last = Some(UpstreamError::Timeout(timeout)),
        }
    }
    Err(last.unwrap_or(UpstreamError::Timeout(timeout)))
}

/// One server: UDP, then TCP if the reply is truncated.
async fn ask(server: SocketAddr, query: &Message) -> Result<Message, String> {
    let mut query = query.clone();
    query.metadata.id = random_id();
    let bytes = query.to_vec().map_err(|e| format!("encoding the query: {e}"))?;
    let answer = ask_udp(server, &bytes, &query).await?;
    if !answer.metadata.truncation {
        return Ok(answer);
    }
    query.metadata.id = random_id();
    let bytes = query.to_vec().map_err(|e| format!("encoding the query: {e}"))?;
    ask_tcp(server, &bytes, &query).await
}

fn unspecified(server: SocketAddr) -> SocketAddr {
    match server {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

async fn ask_udp(server: SocketAddr, bytes: &[u8], query: &Message) -> Result<Message, String> {
    // A connected socket: the kernel drops datagrams from anyone else, and an ICMP port
    // unreachable fails the receive at once instead of waiting out the timeout.
    let socket = UdpSocket::bind(unspecified(server)).await.map_err(|e| e.to_string())?;
    socket.connect(server).await.map_err(|e| e.to_string())?;
    socket.send(bytes).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let n = socket.recv(&mut buf).await.map_err(|e| e.to_string())?;
        let Some(datagram) = buf.get(..n) else { continue };
        // Not an answer to this query (late, spoofed or garbage): keep waiting.
        if let Some(answer) = Message::from_vec(datagram).ok().filter(|a| answers(a, query)) {
            return Ok(answer);
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
}
