//! The agent's DNS proxy (`crate::dns`) and its kernel half: started with the agent, told the
//! policy and the services' counter slots on every apply, asked for its status.

use std::sync::Arc;

use metrics::counter;
use tracing::{info, warn};

use super::config::{AgentError, DnsSettings};
use super::control::DnsStatus;
use super::kernel::KernelError;
use super::telemetry;
use crate::datapath::{abi, pins::PinLayout};
use crate::dns::kernel::KernelDns;
use crate::dns::{AllowChange, AllowSet, DnsEvent, DnsPolicy, Proxy, ProxyConfig};
use crate::snapshot::Snapshot;
use crate::verdict::Verdict;

/// The running DNS proxy and its kernel half.
pub struct DnsRuntime {
    proxy: Proxy,
    kernel: Arc<KernelDns>,
}

impl DnsRuntime {
    /// Starts the proxy: questions are attributed from the kernel's slots, admitted addresses go
    /// into `DF_NAMES` before the answer leaves, and every event not simply allowed goes to
    /// `report` (after it is counted in the metrics).
    pub async fn start(
        settings: &DnsSettings,
        layout: &PinLayout,
        report: impl Fn(DnsEvent) + Send + Sync + 'static,
    ) -> Result<DnsRuntime, AgentError> {
        let kernel = Arc::new(KernelDns::open(layout).map_err(KernelError::from)?);
        let sink = Arc::clone(&kernel);
        let allow = Arc::new(AllowSet::new(settings.ttl, abi::MAX_NAMES as usize / 2, move |change: &AllowChange| {
            if let Err(e) = sink.apply_change(change) {
                warn!("dns allow set: {e}");
            }
        }));
        tokio::spawn(Arc::clone(&allow).run_sweeper());
        let config = ProxyConfig {
            port: settings.port,
            upstreams: settings.upstreams.clone(),
            deny: settings.deny,
            ..ProxyConfig::default()
        };
        let events = move |event: DnsEvent| {
            telemetry::export_dns_event(&event);
            if !matches!(&event, DnsEvent::Query(q) if q.verdict == Verdict::Allowed) {
                report(event);
            }
        };
        let attributor: Arc<dyn crate::dns::Attributor> = Arc::clone(&kernel) as _;
        let proxy = Proxy::bind(config, DnsPolicy::default(), attributor, allow, events).await?;
        info!(port = proxy.port(), upstreams = ?proxy.upstreams(), "dns proxy listening on loopback");
        Ok(DnsRuntime { proxy, kernel })
    }

    /// The proxy's port on loopback.
    pub fn port(&self) -> u16 {
        self.proxy.port()
    }

    /// Follows a newly applied policy: its names per service, and the services' counter slots.
    pub fn follow(&self, snapshot: &Snapshot, environment: usize, slots: impl Iterator<Item = (String, u32)>) {
        let slots: Vec<(String, u32)> = slots.collect();
        self.kernel.set_services(slots.iter().map(|(name, slot)| (name.as_str(), *slot)));
        self.proxy.set_policy(DnsPolicy::from_snapshot(snapshot, environment));
    }

    /// What `policyctl status` shows of the proxy.
    pub fn status(&self) -> DnsStatus {
        DnsStatus {
            port: self.proxy.port(),
            upstreams: self.proxy.upstreams().to_vec(),
            admitted: self.kernel.admitted(),
        }
    }
}

/// Counts a DNS event that could not reach the agent's state task (its queue was full).
pub fn count_dropped() {
    counter!("depfence_dns_events_dropped_total").increment(1);
}
