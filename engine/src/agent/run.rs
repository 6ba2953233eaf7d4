//! The agent's run loop: set-up (cgroup2, bpffs, the locks on the pin root and the state
//! directory, the kernel, metrics, the control socket, the file watcher, the DNS proxy), then one task that owns the [`State`] and does everything in
//! order: reloads (file change, SIGHUP, `policyctl reload`), cgroup scans (every
//! `scan_interval`, so a new cgroup is under its policy well within a second), event draining,
//! sampling and requests. The control socket, the watcher and the DNS proxy only send it
//! messages.

use std::path::Path;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::config::{AgentConfig, AgentError, io_error};
use super::control::{self, Message};
use super::dns::{self, DnsRuntime};
use super::kernel::Kernel;
use super::lock::AgentLock;
use super::state::State;
use super::telemetry;
use super::watcher::watch_policy;
use crate::cgroup::{Cgroup2, walk};
use crate::compile::compile_path;
use crate::datapath::pins::{self, PinLayout};

/// Runs the agent until `shutdown` completes. Pins stay in place when it returns: the kernel
/// keeps enforcing the last policy.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let cgroup2 = Cgroup2::discover()?;
    std::fs::create_dir_all(&config.state_dir).map_err(io_error("creating", &config.state_dir))?;
    let (bpffs, mounted) = pins::ensure_bpffs().map_err(io_error("mounting bpffs at", Path::new(pins::BPFFS)))?;
    if mounted {
        info!(path = %bpffs.display(), "mounted bpffs");
    }
    // Validate what can be validated before touching the kernel.
    if let Ok(compiled) = compile_path(&config.policy)
        && compiled.snapshot.environment_index(&config.environment).is_none()
    {
        let declared: Vec<&str> = compiled.snapshot.environments().iter().map(|e| e.name.as_str()).collect();
        return Err(AgentError::UnknownEnvironment {
            environment: config.environment.clone(),
            declared: declared.join(", "),
        });
    }
    // One agent per pin root and state directory, held until this function returns.
    std::fs::create_dir_all(&config.pin_root).map_err(io_error("creating", &config.pin_root))?;
    let _lock = tokio::task::block_in_place(|| {
        AgentLock::acquire(&[&config.pin_root, &config.state_dir], config.lock_wait, config.takeover)
    })?;
    let layout = PinLayout::new(&config.pin_root);
    // The tree this agent polices: the whole mount, or the subtree `--cgroup-root` names.
    let tree =
        config.cgroup_root.as_ref().map_or_else(|| cgroup2.mount().to_owned(), |root| cgroup2.mount().join(root));
    if !tree.is_dir() {
        return Err(io_error("reading the cgroup root", &tree)(std::io::Error::from(std::io::ErrorKind::NotFound)));
    }
    let mut kernel = Kernel::open(&layout, &config.state_dir, &tree, config.rule_capacity)?;

    telemetry::describe();
    if let Some(addr) = config.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| AgentError::Metrics { addr, message: e.to_string() })?;
        info!(%addr, "metrics on http://{addr}/metrics");
    }

    let (tx, mut rx) = mpsc::channel::<Message>(64);
    let listener = control::bind(&config.control_socket)?;
    tokio::spawn(control::serve(listener, tx.clone()));
    let changes = tx.clone();
    let _watcher = watch_policy(&config.policy, move |seen| {
        let _ = changes.try_send(Message::PolicyChanged(seen));
    });
    let dns = match &config.dns {
        Some(settings) => {
            let events = tx.clone();
            let report = move |event| {
                if events.try_send(Message::Dns(event)).is_err() {
                    dns::count_dropped();
                }
            };
            let dns = DnsRuntime::start(settings, &layout, report).await?;
            let own = crate::dns::kernel::own_cgroup_id(&cgroup2).unwrap_or(0);
            kernel.set_dns_proxy(dns.port(), own);
            Some(dns)
        }
        None => None,
    };

    let mut state = State::new(config, kernel, dns, SystemTime::now());
    // Consumers before producers: the event log exists before the first apply.
    let found = walk(&tree).unwrap_or_default();
    tokio::task::block_in_place(|| {
        state.set_found(found);
        state.reload("start", SystemTime::now());
    });
    state.sample(SystemTime::now());
    info!(ready = state.ready(), "agent running");

    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(io_error("installing the SIGHUP handler", Path::new("-")))?;
    let mut scan = tokio::time::interval(state.config().scan_interval);
    let mut drain = tokio::time::interval(Duration::from_millis(100));
    let mut sample = tokio::time::interval(Duration::from_secs(1));
    for timer in [&mut scan, &mut drain, &mut sample] {
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    tokio::pin!(shutdown);
    let mut reload_at: Option<tokio::time::Instant> = None;
    loop {
        let settle = reload_at.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep_until(settle), if reload_at.is_some() => {
                reload_at = None;
                tokio::task::block_in_place(|| state.reload_settled(SystemTime::now()));
            }
            _ = hangup.recv() => {
                tokio::task::block_in_place(|| state.reload_everything("SIGHUP", SystemTime::now()));
            }
            _ = scan.tick() => match walk(&tree) {
                Ok(found) => tokio::task::block_in_place(|| state.set_found(found)),
                Err(e) => warn!("scanning cgroups: {e}"),
            },
            _ = drain.tick() => state.drain_events(SystemTime::now()),
            _ = sample.tick() => tokio::task::block_in_place(|| state.sample(SystemTime::now())),
            message = rx.recv() => match message {
                None => break,
                Some(Message::Dns(event)) => state.dns_event(event, SystemTime::now()),
                Some(Message::PolicyChanged(seen)) => {
                    // Editors write in several steps: let the burst settle, then apply once. The
                    // compile starts now and overlaps the settle; a later change restarts both.
                    reload_at = Some(tokio::time::Instant::now() + state.config().reload_settle);
                    state.policy_changed(seen);
                }
                Some(Message::Request(request, uid, reply)) => {
                    state.drain_events(SystemTime::now());
                    let response = tokio::task::block_in_place(|| state.handle(request, uid, SystemTime::now()));
                    let _ = reply.send(response);
                }
                Some(Message::Subscribe(recent, reply)) => {
                    state.drain_events(SystemTime::now());
                    let _ = reply.send(state.subscribe(recent));
                }
            },
        }
    }
    state.persist(SystemTime::now());
    state.stop_dns();
    info!("agent stopping; the kernel keeps enforcing the last policy");
    let _ = std::fs::remove_file(&state.config().control_socket);
    Ok(())
}
