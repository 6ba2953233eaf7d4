//! The DNS proxy under abuse: while one client floods it with malformed and oversized messages
//! (UDP garbage, short headers, oversized datagrams; TCP connections that send a 65535-byte
//! length prefix and stall, or garbage frames, and never read), another client's lookups are
//! still answered, correctly and promptly, over UDP and TCP. A client that pipelines questions
//! and never reads the answers loses its TCP connection after the idle timeout.
//!
//! Real sockets on loopback only, no privileges, no external tool: the upstream is a small Rust
//! server (`FakeUpstream`). The proxy is started as the agent starts it (`Proxy::bind`), with a
//! static attributor.

#![cfg(feature = "dns")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs,
    reason = "tests: a failing test should say where"
)]

mod dns_support;

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use depfence::dns::{DnsEvent, ProxyConfig, slot_addr};
use depfence::verdict::Verdict;
use dns_support::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A small deterministic generator (xorshift64*): garbage that is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// One malformed or oversized datagram.
fn garbage_datagram(rng: &mut Rng) -> Vec<u8> {
    let query = encode_query(rng.next() as u16, "a.mirror.internal", RecordType::A);
    match rng.below(8) {
        // Random bytes of any size up to a few hundred.
        0 | 1 => {
            let len = rng.below(600);
            rng.bytes(len)
        }
        // Less than a header.
        2 => {
            let len = rng.below(12);
            rng.bytes(len)
        }
        // A header promising records that are not there.
        3 => {
            let mut m = query[..12].to_vec();
            m[4..12].copy_from_slice(&[0xff; 8]);
            m
        }
        // A name that points at itself (a compression loop).
        4 => {
            let mut m = query[..12].to_vec();
            m.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
            m
        }
        // A response, which must never be answered.
        5 => {
            let mut m = query.clone();
            m[2] |= 0x80;
            m
        }
        // A valid query followed by junk past the UDP size the proxy reads (4096 bytes).
        6 => {
            let mut m = query.clone();
            let len = 8000 + rng.below(20_000);
            m.extend(rng.bytes(len));
            m
        }
        // A query cut in the middle of its question.
        _ => query[..query.len() - 3].to_vec(),
    }
}

/// Floods `to` with malformed datagrams as fast as it makes them, until `stop`; counts what it
/// sent.
fn flood_udp(to: SocketAddr, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    while !stop.load(Ordering::Relaxed) {
        // ENOBUFS and friends: the flood goes on.
        if socket.send_to(&garbage_datagram(&mut rng), to).is_ok() {
            sent.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// TCP connections that stall: a 65535-byte length prefix and nothing more; the prefix and part
/// of the message; half a prefix; nothing at all. Held open until `stop`.
fn stall_tcp(to: SocketAddr, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let mut rng = Rng(7);
    let mut held = Vec::new();
    for opening in [vec![0xff, 0xff], [vec![0xff, 0xff], rng.bytes(1000)].concat(), vec![0x01], vec![]] {
        for _ in 0..4 {
            let mut stream = TcpStream::connect(to).unwrap();
            stream.write_all(&opening).unwrap();
            sent.fetch_add(1, Ordering::Relaxed);
            held.push(stream);
        }
    }
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(20));
    }
}

/// TCP connections that send garbage frames (a full 65535-byte one, empty ones, short ones,
/// responses, random ones) and never read an answer; a new connection when one breaks.
fn garbage_tcp(to: SocketAddr, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let mut rng = Rng(0xdead_beef);
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut stream) = TcpStream::connect(to) else { continue };
        let mut frames = vec![[vec![0xff, 0xff], rng.bytes(0xffff)].concat()];
        for _ in 0..50 {
            let body = match rng.below(3) {
                0 => Vec::new(),
                1 => garbage_datagram(&mut rng).into_iter().take(0xffff).collect(),
                _ => rng.bytes(5),
            };
            frames.push([(body.len() as u16).to_be_bytes().to_vec(), body].concat());
        }
        for frame in frames {
            if stop.load(Ordering::Relaxed) || stream.write_all(&frame).is_err() {
                break;
            }
            sent.fetch_add(1, Ordering::Relaxed);
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// One lookup over UDP as a stub resolver does it: resent every 300 ms, up to `limit`. The
/// reply must have the query's id.
async fn udp_lookup(server: SocketAddr, name: &str, limit: Duration) -> (ResponseCode, Vec<IpAddr>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(server).await.unwrap();
    let id = 0x5151;
    let query = encode_query(id, name, RecordType::A);
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; 4096];
    while Instant::now() < deadline {
        socket.send(&query).await.unwrap();
        if let Ok(n) = tokio::time::timeout(Duration::from_millis(300), socket.recv(&mut buf)).await {
            let reply = Message::from_vec(&buf[..n.unwrap()]).unwrap();
            assert_eq!(reply.metadata.id, id);
            return answer_of(&reply);
        }
    }
    panic!("no answer over UDP for {name} within {limit:?}");
}

/// One lookup over a new TCP connection, within `limit`.
async fn tcp_lookup(server: SocketAddr, name: &str, limit: Duration) -> (ResponseCode, Vec<IpAddr>) {
    let lookup = async {
        let mut stream = tokio::net::TcpStream::connect(server).await.unwrap();
        let query = encode_query(0x6161, name, RecordType::A);
        stream.write_all(&[(query.len() as u16).to_be_bytes().to_vec(), query].concat()).await.unwrap();
        let len = stream.read_u16().await.unwrap();
        let mut buf = vec![0u8; usize::from(len)];
        stream.read_exact(&mut buf).await.unwrap();
        let reply = Message::from_vec(&buf).unwrap();
        assert_eq!(reply.metadata.id, 0x6161);
        answer_of(&reply)
    };
    tokio::time::timeout(limit, lookup)
        .await
        .unwrap_or_else(|_| panic!("no answer over TCP for {name} within {limit:?}"))
}

fn answer_of(reply: &Message) -> (ResponseCode, Vec<IpAddr>) {
    let addrs = reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect();
    (reply.metadata.response_code, addrs)
}

fn malformed(h: &Harness) -> usize {
    h.events().iter().filter(|e| matches!(e, DnsEvent::Malformed { .. })).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_keeps_answering_others_while_one_client_sends_garbage() {
    let upstream = FakeUpstream::start().await;
    let h = Harness::start(ProxyConfig { upstreams: vec![upstream.addr], ..config() }, "enforce").await;
    let good = SocketAddr::new(slot_addr(21).into(), h.port());
    let bad = SocketAddr::new(slot_addr(22).into(), h.port());
    h.attribute(good.ip(), 100, "good");
    h.attribute(bad.ip(), 666, "bad");
    let expected = (ResponseCode::NoError, vec![IpAddr::V4(FakeUpstream::ADDR)]);
    assert_eq!(udp_lookup(good, "a.mirror.internal", Duration::from_secs(2)).await, expected);

    let stop = Arc::new(AtomicBool::new(false));
    let counters: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let abusers: Vec<thread::JoinHandle<()>> = [flood_udp, stall_tcp, garbage_tcp]
        .into_iter()
        .zip(&counters)
        .map(|(abuse, sent)| {
            let (stop, sent) = (Arc::clone(&stop), Arc::clone(sent));
            thread::spawn(move || abuse(bad, stop, sent))
        })
        .collect();
    // The abuse has reached the proxy before the lookups start.
    let started = Instant::now();
    while malformed(&h) < 200 {
        assert!(started.elapsed() < Duration::from_secs(10), "the abuse never reached the proxy");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let limit = Duration::from_secs(2);
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let name = format!("n{i}.mirror.internal");
        let t = Instant::now();
        let answer =
            if i % 2 == 0 { udp_lookup(good, &name, limit).await } else { tcp_lookup(good, &name, limit).await };
        assert_eq!(answer, expected, "{name}");
        slowest = slowest.max(t.elapsed());
        // Spread over a second or so of abuse.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A denied name is still refused, not answered.
    assert_eq!(udp_lookup(good, "evil.example", limit).await.0, ResponseCode::Refused);
    let during = malformed(&h);

    stop.store(true, Ordering::Relaxed);
    for abuser in abusers {
        abuser.join().unwrap();
    }
    let sent: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    eprintln!(
        "abuse sent (udp datagrams, stalled tcp connections, tcp frames) {sent:?}; {during} malformed messages seen; slowest lookup {slowest:?}"
    );
    assert!(sent.iter().all(|&n| n > 0), "an abuser sent nothing: {sent:?}");
    // Every question of the good client was judged as its own (a resent one may be twice).
    let good_events: Vec<_> = h.query_events().into_iter().filter(|e| e.who.pid == 100).collect();
    for i in 0..20 {
        let name = format!("n{i}.mirror.internal");
        assert!(good_events.iter().any(|e| e.name == name && e.verdict == Verdict::Allowed), "{name}");
    }
    assert!(good_events.iter().any(|e| e.name == "evil.example" && e.verdict == Verdict::Rejected));
    // The stalled connections and the flood did not leave the proxy unable to answer.
    assert_eq!(tcp_lookup(good, "after.mirror.internal", limit).await, expected);
}

/// When a client that never reads saw its writes block, and its connection closed by the proxy.
#[derive(Debug, Default)]
struct NonReader {
    stuck: Option<Instant>,
    closed: Option<Instant>,
}

/// A TCP connection that pipelines questions (long names: long answers) and never reads an
/// answer: it writes until its writes block (then sets `stuck`), and goes on trying until the
/// proxy closes the connection or `stop`.
fn never_read_tcp(to: SocketAddr, stop: Arc<AtomicBool>, stuck: Arc<AtomicBool>) -> NonReader {
    let name = format!("{}.example", vec!["x".repeat(60); 3].join("."));
    let query = encode_query(0x7171, &name, RecordType::A);
    let burst = [(query.len() as u16).to_be_bytes().to_vec(), query].concat().repeat(64);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    // A small window: the proxy's answers back up soon.
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&to.into()).unwrap();
    let mut stream = TcpStream::from(socket);
    stream.set_write_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut seen = NonReader::default();
    while !stop.load(Ordering::Relaxed) {
        match stream.write_all(&burst) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                if seen.stuck.is_none() {
                    seen.stuck = Some(Instant::now());
                    stuck.store(true, Ordering::Relaxed);
                }
            }
            // Reset: the proxy closed the connection with questions unread.
            Err(_) => {
                seen.closed = Some(Instant::now());
                break;
            }
        }
    }
    seen
}

/// One lookup over a new TCP connection: the answer, or None when the proxy closes the
/// connection (it had no room for it) or does not answer within 500 ms.
async fn tcp_lookup_once(server: SocketAddr, name: &str) -> Option<(ResponseCode, Vec<IpAddr>)> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(server).await.ok()?;
        let query = encode_query(0x6262, name, RecordType::A);
        stream.write_all(&[(query.len() as u16).to_be_bytes().to_vec(), query].concat()).await.ok()?;
        let len = stream.read_u16().await.ok()?;
        let mut buf = vec![0u8; usize::from(len)];
        stream.read_exact(&mut buf).await.ok()?;
        Some(answer_of(&Message::from_vec(&buf).ok()?))
    };
    tokio::time::timeout(Duration::from_millis(500), attempt).await.ok().flatten()
}

/// A client that pipelines questions and never reads the answers holds its TCP connection (here
/// the only one the proxy allows) until an answer has not left for the idle timeout; then the
/// proxy closes it, and other clients get TCP answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_client_that_never_reads_its_answers_is_disconnected() {
    let upstream = FakeUpstream::start().await;
    let idle = Duration::from_secs(2);
    let config =
        ProxyConfig { upstreams: vec![upstream.addr], max_tcp_connections: 1, tcp_idle_timeout: idle, ..config() };
    let h = Harness::start(config, "enforce").await;
    let good = SocketAddr::new(slot_addr(31).into(), h.port());
    h.attribute(good.ip(), 100, "good");
    // The non-reader is nobody the proxy knows: its questions are refused at once, each with
    // its (long) question echoed.
    let reader = SocketAddr::new(slot_addr(32).into(), h.port());

    let (stop, stuck) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let abuser = {
        let (stop, stuck) = (Arc::clone(&stop), Arc::clone(&stuck));
        thread::spawn(move || never_read_tcp(reader, stop, stuck))
    };
    let started = Instant::now();
    while !stuck.load(Ordering::Relaxed) {
        assert!(!abuser.is_finished() && started.elapsed() < Duration::from_secs(10), "the non-reader never got stuck");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Its connection is the only one: another client's is closed at once.
    assert_eq!(tcp_lookup_once(good, "a.mirror.internal").await, None, "a second connection was served");
    assert!(h.events().iter().any(|e| matches!(e, DnsEvent::Overloaded { .. })));

    // Within the idle timeout (and some slack), the proxy lets the non-reader go.
    let deadline = Instant::now() + idle + Duration::from_secs(3);
    while !abuser.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let seen = abuser.join().unwrap();
    let (stuck_at, closed_at) = (seen.stuck.unwrap(), seen.closed);
    let closed_at =
        closed_at.unwrap_or_else(|| panic!("the proxy kept a non-reading connection open {:?}", stuck_at.elapsed()));
    eprintln!(
        "the non-reader was stuck {:?} after it connected, and closed {:?} later",
        stuck_at - started,
        closed_at - stuck_at
    );
    let expected = (ResponseCode::NoError, vec![IpAddr::V4(FakeUpstream::ADDR)]);
    assert_eq!(tcp_lookup_once(good, "a.mirror.internal").await, Some(expected));
}
