//! The proxy: its configuration, binding the UDP and TCP listeners on loopback (IPv4 and IPv6),
//! and the serving loops that hand each message to the answering code (`answer`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex as AsyncMutex, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::allow::AllowSet;
use super::answer::{AnswerSettings, Answerer, DenyResponse, Unattributed, header_error};
use super::attrib::{Attributor, Transport};
use super::cache::{CacheSettings, CacheStats};
use super::event::{DnsEvent, EventSink};
use super::names::DnsPolicy;
use super::socket::{PktUdp, tcp_listener};
use super::upstream::{self, MAX_UDP, Servers};

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
    /// The answer cache's bounds (`max_entries: 0` turns it off).
    pub cache: CacheSettings,
    /// Queries handled at once; beyond it a query gets `SERVFAIL` at once.
    pub max_in_flight: usize,
    /// TCP connections at once; beyond it a connection is closed at once.
    pub max_tcp_connections: usize,
    /// A TCP connection that sends no query for this long is closed (once its answers are
    /// out); so is one whose answer cannot be written for this long (a client that does not
    /// read its answers).
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
            cache: CacheSettings::default(),
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

/// What the listeners and their tasks share.
struct Inner {
    config: ProxyConfig,
    answerer: Arc<Answerer>,
    attributor: Arc<dyn Attributor>,
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
        f.debug_struct("Proxy").field("port", &self.port).field("upstreams", &self.upstreams()).finish()
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
        let settings =
            AnswerSettings { deny: config.deny, unattributed: config.unattributed, probe_denied: config.probe_denied };
        let upstream = Servers::new(upstreams, config.upstream_timeout);
        let answerer = Arc::new(Answerer::new(settings, upstream, policy, allow, events).with_cache(config.cache));
        let inner = Arc::new(Inner {
            in_flight: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            config,
            answerer,
            attributor,
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
        self.inner.answerer.upstream().addrs()
    }

    /// The allow set the proxy feeds.
    pub fn allow_set(&self) -> &Arc<AllowSet> {
        self.inner.answerer.allow_set()
    }

    /// The answer cache's hits, misses and size.
    pub fn cache_stats(&self) -> CacheStats {
        self.inner.answerer.cache_stats()
    }

    /// Replaces the policy; queries received from now on are judged by it. Allow-set entries
    /// admitted under the old one stay until they expire (at most the TTL cap).
    pub fn set_policy(&self, policy: DnsPolicy) {
        self.inner.answerer.set_policy(policy);
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
            inner.answerer.report(DnsEvent::Overloaded { client: datagram.client });
            if let Some(reply) = header_error(&bytes, ResponseCode::ServFail) {
                let _ = socket.send(&reply, datagram.client, datagram.local.ip()).await;
            }
            continue;
        };
        let inner = Arc::clone(&inner);
        let socket = Arc::clone(&socket);
        let mut answering = Box::pin(async move {
            let _permit = permit;
            let who = inner.attributor.attribute(datagram.client, datagram.local, Transport::Udp);
            if let Some(reply) =
                inner.answerer.answer(&bytes, who, datagram.client, datagram.local, Transport::Udp).await
            {
                // The client may be gone; nothing to do about it.
                let _ = socket.send(&reply, datagram.client, datagram.local.ip()).await;
            }
        });
        // What is answered without waiting (a cache hit, a refusal, an error) is answered here,
        // on the listener's thread, as soon as it arrives; what waits (upstream) goes on as its
        // own task, which polls it again with its own waker.
        if answering.as_mut().poll(&mut Context::from_waker(Waker::noop())).is_pending() {
            tokio::spawn(answering);
        }
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
            inner.answerer.report(DnsEvent::Overloaded { client });
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
        let pipeline = Arc::clone(&pipeline);
        running.spawn(async move {
            let _permit = permit;
            let Some(reply) = inner.answerer.answer(&bytes, who, client, local, Transport::Tcp).await else { return };
            let Ok(len) = u16::try_from(reply.len()) else { return };
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&reply);
            let mut writer = writer.lock().await;
            // The connection is closing: the client stopped taking its answers.
            if pipeline.is_closed() {
                return;
            }
            // An answer that does not leave within the idle timeout (a client that does not
            // read its answers, and would otherwise hold the connection and its slot forever)
            // or cannot leave at all: no more reads, the answers still queued are dropped.
            let write = tokio::time::timeout(inner.config.tcp_idle_timeout, writer.write_all(&framed)).await;
            if !matches!(write, Ok(Ok(()))) {
                pipeline.close();
            }
        });
    }
    // The client closed its side, went idle or stopped reading: finish what it asked (each
    // answer within the idle timeout), then close.
    while running.join_next().await.is_some() {}
    let _ = writer.lock().await.shutdown().await;
}
