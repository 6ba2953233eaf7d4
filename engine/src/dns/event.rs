//! What the proxy reports: one [`QueryEvent`] per answered question and the other
//! [`DnsEvent`]s, delivered to an [`EventSink`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::allow::SharedAddress;
use super::attrib::{Attribution, Transport};
use super::upstream::UpstreamError;
use crate::policy::Mode;
use crate::verdict::Verdict;

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
    /// Whether the answer came from the proxy's cache (the judgement, the admission and this
    /// event are the same either way).
    pub cache: CacheUse,
    /// From receipt to reply.
    pub elapsed: Duration,
}

/// Where an answer came from, as far as the answer cache is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheUse {
    /// The cache was not consulted: a denied name, a cache that is off, a message it cannot key.
    #[default]
    NotAsked,
    /// Answered from the cache: not sent upstream.
    Hit,
    /// Not in the cache: asked upstream (and kept, when the answer may be).
    Miss,
}

impl CacheUse {
    /// `hit`, `miss` or `none`, for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheUse::NotAsked => "none",
            CacheUse::Hit => "hit",
            CacheUse::Miss => "miss",
        }
    }
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
        /// True when forwarded ([`Unattributed::Forward`](super::Unattributed::Forward)), false
        /// when refused.
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
