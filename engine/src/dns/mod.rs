//! The userspace core of DNS-aware backends: host-name rules enforced through a DNS
//! proxy that knows which process asked.
//!
//! - [`names`]: per service, the names it may resolve ([`NameMatcher`], from the snapshot's
//!   host rules), matched on label boundaries, case-insensitively.
//! - [`Answerer`]: one message from bytes to reply: parsed, judged by the asker's policy,
//!   forwarded through an [`Upstream`] when allowed ([`Servers`] in the proxy), the answered
//!   addresses admitted; no socket, so tests and the fuzz targets call it directly.
//! - [`Proxy`]: UDP and TCP listeners on loopback (IPv4 and IPv6) that receive queries sent to
//!   any `127.53.x.y` address or to `[::1]`, ask an [`Attributor`] who sent each one, and answer
//!   from the address it was sent to. An allowed name is resolved upstream; a denied one gets `REFUSED`
//!   (or `NXDOMAIN`) in enforce, and is answered but reported in audit. An upstream failure
//!   gives a prompt `SERVFAIL`.
//! - [`AnswerCache`]: upstream answers by question (name, type, class, RD/DO/CD), each for its
//!   TTL (negative ones per RFC 2308), bounded in entries and bytes; it saves the trip upstream
//!   and nothing else: every question is still judged, admitted and reported.
//! - [`AllowSet`]: the A/AAAA answers of allowed names, per service, for the record's TTL
//!   clamped to a floor and a cap, with change notifications for the kernel maps, and
//!   shared-address conflict reports.
//!
//! - [`kernel`] (feature `agent`): the kernel half as the agent runs it: the attributor that
//!   reads the eBPF redirect's records, and the `DF_NAMES` writer for admitted addresses (see
//!   the README, "Host-name rules: the DNS proxy").

pub mod allow;
mod answer;
pub mod attrib;
pub mod cache;
mod event;
#[cfg(feature = "agent")]
pub mod kernel;
pub mod names;
mod proxy;
mod socket;
pub mod upstream;

pub use allow::{AllowChange, AllowEntry, AllowSet, AllowSink, SharedAddress, TtlBounds};
pub use answer::{AnswerSettings, Answerer, Clock, DenyResponse, Unattributed};
pub use attrib::{Attribution, Attributor, StaticAttributor, Transport, slot_addr, slot_index};
pub use cache::{AnswerCache, CacheSettings, CacheStats};
pub use event::{CacheUse, DnsEvent, EventSink, QueryEvent};
pub use names::{DnsPolicy, Grant, NameMatcher, ServicePolicy};
pub use proxy::{DnsError, Proxy, ProxyConfig};
pub use upstream::{Servers, Upstream, UpstreamError};

/// Now, on tokio's clock (so tests with a paused clock see time pass), as a std instant.
pub fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}
