//! Fixtures of the DNS tests: tool discovery (skip with a reason, fail under CI), a dnsmasq
//! upstream on its own loopback address, the proxy with a static attributor and recorded events,
//! a dig wrapper and a small Rust stub resolver.

#![allow(dead_code, unused_imports, reason = "each test binary uses a different part")]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use depfence::compile::compile_str;
use depfence::dns::{
    AllowChange, AllowSet, Attribution, DnsEvent, DnsPolicy, Proxy, ProxyConfig, QueryEvent, StaticAttributor,
    TtlBounds,
};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use depfence_integration::dns::Dnsmasq;

/// The tools a test needs.
pub struct Tools {
    pub dnsmasq: PathBuf,
    pub dig: Option<PathBuf>,
}

impl Tools {
    pub fn require(test: &str, dig: bool) -> Option<Tools> {
        let dnsmasq = depfence_integration::dns::require_dnsmasq(test)?;
        let dig = if dig { Some(depfence_integration::require_tool(test, "dig", "bind9-dnsutils")?) } else { None };
        Some(Tools { dnsmasq, dig })
    }
}

pub fn encode_query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

fn decode(bytes: &[u8]) -> (ResponseCode, Vec<IpAddr>) {
    let m = Message::from_vec(bytes).unwrap();
    let addrs = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    (m.metadata.response_code, addrs)
}

/// One query over a connected UDP socket (which only accepts replies from `server`), 2 s
/// timeout. The reply's id must match.
pub async fn udp_query(server: SocketAddr, name: &str, qtype: RecordType) -> (ResponseCode, Vec<IpAddr>) {
    let local: SocketAddr = if server.is_ipv4() { "127.0.0.1:0".parse().unwrap() } else { "[::1]:0".parse().unwrap() };
    let socket = tokio::net::UdpSocket::bind(local).await.unwrap();
    socket.connect(server).await.unwrap();
    let id = rand_id();
    socket.send(&encode_query(id, name, qtype)).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no reply from {server} for {name}"))
        .unwrap();
    assert_eq!(Message::from_vec(&buf[..n]).unwrap().metadata.id, id);
    decode(&buf[..n])
}

fn rand_id() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    (h.finish() & 0xffff) as u16
}

/// Several queries on one TCP connection, all written first (pipelined), replies matched by id.
pub async fn tcp_queries(server: SocketAddr, queries: &[(&str, RecordType)]) -> Vec<(ResponseCode, Vec<IpAddr>)> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(server)).await.unwrap().unwrap();
    let base = rand_id();
    for (i, (name, qtype)) in queries.iter().enumerate() {
        let q = encode_query(base.wrapping_add(i as u16), name, *qtype);
        stream.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        stream.write_all(&q).await.unwrap();
    }
    let mut out = vec![None; queries.len()];
    for _ in 0..queries.len() {
        let read = async {
            let len = stream.read_u16().await.unwrap();
            let mut buf = vec![0u8; usize::from(len)];
            stream.read_exact(&mut buf).await.unwrap();
            buf
        };
        let buf = tokio::time::timeout(Duration::from_secs(3), read).await.expect("tcp reply");
        let id = Message::from_vec(&buf).unwrap().metadata.id;
        let i = usize::from(id.wrapping_sub(base));
        out[i] = Some(decode(&buf));
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// One answer line of dig.
#[derive(Debug, Clone)]
pub struct DigAnswer {
    pub name: String,
    pub ttl: u32,
    pub kind: String,
    pub data: String,
}

#[derive(Debug)]
pub struct Dig {
    pub status: String,
    pub answers: Vec<DigAnswer>,
    pub raw: String,
}

impl Dig {
    pub fn addrs(&self) -> Vec<IpAddr> {
        self.answers.iter().filter(|a| a.kind == "A" || a.kind == "AAAA").map(|a| a.data.parse().unwrap()).collect()
    }
}

/// Runs `dig @server -p port name type` (one try, 3 s), over TCP when asked.
pub fn dig(tools: &Tools, server: SocketAddr, name: &str, qtype: &str, tcp: bool) -> Dig {
    let dig = tools.dig.as_ref().expect("the test asked for dig");
    let mut cmd = Command::new(dig);
    cmd.arg(format!("@{}", server.ip())).args(["-p", &server.port().to_string(), "+tries=1", "+time=3", name, qtype]);
    if tcp {
        cmd.arg("+tcp");
    }
    let out = cmd.output().unwrap();
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = raw
        .split("status: ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or_else(|| panic!("no status from dig {name}: {raw}"))
        .to_owned();
    let mut answers = Vec::new();
    let mut in_answer = false;
    for line in raw.lines() {
        if line.starts_with(";; ANSWER SECTION") {
            in_answer = true;
            continue;
        }
        if in_answer {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.len() < 5 {
                break;
            }
            answers.push(DigAnswer {
                name: words[0].to_owned(),
                ttl: words[1].parse().unwrap(),
                kind: words[3].to_owned(),
                data: words[4].to_owned(),
            });
        }
    }
    Dig { status, answers, raw }
}

/// A policy with one service `web` allowed `*.mirror.internal`, in `mode`.
pub fn policy(mode: &str) -> DnsPolicy {
    let text = format!(
        r#"
version = 1
[environments]
test = {{ mode = "{mode}" }}
[services.web]
allow = [ {{ host = "*.mirror.internal" }} ]
"#
    );
    let compiled = compile_str("dns.toml", &text).unwrap_or_else(|(_, d)| panic!("policy: {d:?}"));
    DnsPolicy::from_snapshot(&compiled.snapshot, 0)
}

/// The proxy's config for tests: any port, loopback only.
pub fn config() -> ProxyConfig {
    ProxyConfig { upstream_timeout: Duration::from_millis(800), ..ProxyConfig::default() }
}

/// A running proxy with a static attributor, its events and allow-set changes recorded.
pub struct Harness {
    pub proxy: Proxy,
    pub allow: Arc<AllowSet>,
    pub attributor: Arc<StaticAttributor>,
    events: Arc<Mutex<Vec<DnsEvent>>>,
    changes: Arc<Mutex<Vec<AllowChange>>>,
    sweeper: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.sweeper.abort();
    }
}

impl Harness {
    pub async fn start(config: ProxyConfig, mode: &str) -> Harness {
        Harness::start_with(config, mode, TtlBounds::default()).await
    }

    pub async fn start_with(config: ProxyConfig, mode: &str, ttl: TtlBounds) -> Harness {
        let changes = Arc::new(Mutex::new(Vec::new()));
        let sink = {
            let changes = Arc::clone(&changes);
            move |c: &AllowChange| changes.lock().unwrap().push(c.clone())
        };
        let allow = Arc::new(AllowSet::new(ttl, 100_000, sink));
        let sweeper = tokio::spawn(Arc::clone(&allow).run_sweeper());
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = {
            let events = Arc::clone(&events);
            move |e: DnsEvent| events.lock().unwrap().push(e)
        };
        let attributor = Arc::new(StaticAttributor::new());
        let proxy = Proxy::bind(config, policy(mode), attributor.clone(), Arc::clone(&allow), sink)
            .await
            .unwrap_or_else(|e| panic!("bind the proxy: {e}"));
        Harness { proxy, allow, attributor, events, changes, sweeper }
    }

    pub fn port(&self) -> u16 {
        self.proxy.port()
    }

    /// Queries sent to `local` come from service `web`, `pid`, `comm`.
    pub fn attribute(&self, local: IpAddr, pid: u32, comm: &str) {
        self.attributor.insert(
            local,
            Attribution {
                service: Arc::from("web"),
                cgroup_id: 1000 + u64::from(pid),
                pid,
                comm: comm.to_owned(),
                original_server: "10.0.0.53:53".parse().unwrap(),
            },
        );
    }

    pub fn events(&self) -> Vec<DnsEvent> {
        self.events.lock().unwrap().clone()
    }

    /// Query events in the order the queries were answered.
    pub fn query_events(&self) -> Vec<QueryEvent> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                DnsEvent::Query(q) => Some(q),
                _ => None,
            })
            .collect()
    }

    pub fn changes(&self) -> Vec<AllowChange> {
        self.changes.lock().unwrap().clone()
    }
}

/// Polls `done` every 10 ms up to `limit`; the instant it held, or None.
pub fn poll(limit: Duration, mut done: impl FnMut() -> bool) -> Option<Instant> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// A loopback upstream in Rust (no dnsmasq needed): answers every A question with
/// [`FakeUpstream::ADDR`] (TTL 60) and any other with no record, over UDP.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl FakeUpstream {
    pub const ADDR: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 0, 10);

    pub async fn start() -> FakeUpstream {
        use hickory_proto::rr::Record;
        use hickory_proto::rr::rdata::A;
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else { continue };
                let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
                let mut answer = Message::response(query.metadata.id, query.metadata.op_code);
                answer.metadata.recursion_desired = query.metadata.recursion_desired;
                answer.metadata.recursion_available = true;
                answer.add_queries(query.queries.iter().cloned());
                for q in &query.queries {
                    if q.query_type == RecordType::A {
                        answer.add_answer(Record::from_rdata(q.name.clone(), 60, RData::A(A(FakeUpstream::ADDR))));
                    }
                }
                let _ = socket.send_to(&answer.to_vec().unwrap(), from).await;
            }
        });
        FakeUpstream { addr, task }
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
