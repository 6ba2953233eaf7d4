//! A real Prometheus server for end-to-end tests of the agent's metrics and the shipped alert
//! rules (`deploy/prometheus/depfence-alerts.yml`).
//!
//! [`Prometheus::start`] writes a configuration that scrapes the given targets every second as
//! job `depfence` and evaluates the alert rules every second, starts the `prometheus` binary
//! (Debian's package `prometheus`) on a free loopback port with its storage in a temporary
//! directory, and waits until it is ready. Dropping it kills that one process (by its PID) and
//! removes the directory. Queries go through the HTTP API: one HTTP/1.0 GET over [`TcpStream`]
//! (loopback only), its JSON read with `serde_json`.
//!
//! No privileges are needed. [`require_tool`] skips a test with a reason when the binary is
//! missing, and fails it instead under CI (`CI=true`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The labels of a series or an alert.
pub type Labels = BTreeMap<String, String>;

/// One element of an instant vector: its labels and its value.
pub type Sample = (Labels, f64);

/// How long [`Prometheus::start`] waits for `/-/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of one HTTP request to the server.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// The job name the alert rules select (`up{job="depfence"}`).
pub const JOB: &str = "depfence";

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_owned()
}

/// The shipped alert rules, `deploy/prometheus/depfence-alerts.yml`.
pub fn alert_rules() -> PathBuf {
    repo_root().join("deploy/prometheus/depfence-alerts.yml")
}

/// The promtool unit tests of the alert rules, `deploy/prometheus/depfence-alerts.test.yml`.
pub fn alert_rule_tests() -> PathBuf {
    repo_root().join("deploy/prometheus/depfence-alerts.test.yml")
}

pub use crate::find_tool;

/// [`crate::require_tool`] for the Prometheus binaries (Debian package `prometheus`).
pub fn require_tool(test: &str, tool: &str) -> Option<PathBuf> {
    crate::require_tool(test, tool, "prometheus")
}

/// An alert as `/api/v1/alerts` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// Its labels, `alertname` included.
    pub labels: Labels,
    /// Its annotations, templates expanded.
    pub annotations: Labels,
    /// `pending` or `firing`.
    pub state: String,
    /// The value of the expression when the alert became active or was last evaluated.
    pub value: f64,
}

impl Alert {
    /// The alert's name.
    pub fn name(&self) -> &str {
        self.labels.get("alertname").map_or("", String::as_str)
    }

    /// One label's value, or "" when it has no such label.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// A running Prometheus server. Dropping it kills the server and removes its directory.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    /// Configuration, storage and log; removed when it drops, after the server is killed.
    dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` as job `depfence` with the shipped alert rules.
    pub fn start(targets: &[SocketAddr]) -> io::Result<Prometheus> {
        Prometheus::start_with_rules(targets, &[alert_rules()])
    }

    /// Starts Prometheus scraping `targets` as job `depfence` every second, evaluating the given
    /// rule files every second. Retries with another port when the chosen one was taken.
    pub fn start_with_rules(targets: &[SocketAddr], rule_files: &[PathBuf]) -> io::Result<Prometheus> {
        let binary = find_tool("prometheus")
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "`prometheus` is not installed"))?;
        let dir = tempfile::Builder::new().prefix("depfence-prometheus-").tempdir()?;
        let config = write_config(dir.path(), targets, rule_files)?;
        let mut last = io::Error::other("no attempt made");
        for _ in 0..3 {
            match spawn_and_wait(&binary, dir.path(), &config) {
                Ok((child, addr)) => return Ok(Prometheus { child, dir, addr }),
                // Another process took the port between choosing and binding it: retry.
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// The address of the web server and HTTP API.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Evaluates an instant query now. A scalar comes back as one sample without labels; a
    /// range vector is an error.
    pub fn query(&self, promql: &str) -> io::Result<Vec<Sample>> {
        let data = self.api(&format!("/api/v1/query?query={}", percent_encode(promql)))?;
        let result = data.get("result").ok_or_else(|| bad_response("no `result`"))?;
        match data.get("resultType").and_then(Value::as_str) {
            Some("vector") => {
                let items = result.as_array().ok_or_else(|| bad_response("`result` is not an array"))?;
                items.iter().map(|item| Ok((labels(item.get("metric"))?, sample_value(item.get("value"))?))).collect()
            }
            Some("scalar") => Ok(vec![(Labels::new(), sample_value(Some(result))?)]),
            other => Err(bad_response(&format!("query {promql:?}: unsupported result type {other:?}"))),
        }
    }

    /// The alerts that are pending or firing now.
    pub fn alerts(&self) -> io::Result<Vec<Alert>> {
        let data = self.api("/api/v1/alerts")?;
        let alerts = data.get("alerts").and_then(Value::as_array).ok_or_else(|| bad_response("no `alerts`"))?;
        alerts
            .iter()
            .map(|alert| {
                Ok(Alert {
                    labels: labels(alert.get("labels"))?,
                    annotations: labels(alert.get("annotations"))?,
                    state: alert.get("state").and_then(Value::as_str).unwrap_or_default().to_owned(),
                    value: alert.get("value").and_then(Value::as_str).map_or(Ok(f64::NAN), parse_float)?,
                })
            })
            .collect()
    }

    /// The active alerts other than `name`, as `name {labels}` lines (for "nothing else fires").
    pub fn other_alerts(&self, name: &str) -> io::Result<Vec<String>> {
        Ok(self
            .alerts()?
            .into_iter()
            .filter(|a| a.name() != name)
            .map(|a| format!("{} {:?}", a.name(), a.labels))
            .collect())
    }

    /// Runs `promql` until `predicate` accepts the result, and returns that result; fails after
    /// `timeout` with the last result (or error) and the server's log.
    pub fn wait_for(
        &self,
        promql: &str,
        mut predicate: impl FnMut(&[Sample]) -> bool,
        timeout: Duration,
    ) -> io::Result<Vec<Sample>> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.query(promql) {
                Ok(samples) if predicate(&samples) => return Ok(samples),
                Ok(samples) => format!("last result {samples:?}"),
                Err(e) => format!("last error {e}"),
            };
            if Instant::now() >= deadline {
                return Err(self.timed_out(&format!("{promql:?}: {last}"), timeout));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until an alert named `name` is pending or firing, and returns it.
    pub fn wait_for_alert(&self, name: &str, timeout: Duration) -> io::Result<Alert> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.alerts() {
                Ok(alerts) => match alerts.into_iter().find(|a| a.name() == name) {
                    Some(alert) => return Ok(alert),
                    None => "not active".to_owned(),
                },
                Err(e) => format!("last error {e}"),
            };
            if Instant::now() >= deadline {
                return Err(self.timed_out(&format!("alert {name}: {last}"), timeout));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn timed_out(&self, what: &str, timeout: Duration) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("timed out after {timeout:?} waiting for {what}\nprometheus log:\n{}", tail(&self.log(), 30)),
        )
    }

    /// GETs an API path and returns the `data` of a successful response.
    fn api(&self, path: &str) -> io::Result<Value> {
        let (status, body) = http_get(self.addr, path)?;
        let mut response: Value = serde_json::from_slice(&body)
            .map_err(|e| bad_response(&format!("{path}: {e}: {}", String::from_utf8_lossy(&body))))?;
        if status != 200 || response.get("status").and_then(Value::as_str) != Some("success") {
            let error = response.get("error").and_then(Value::as_str).unwrap_or("no error message");
            return Err(io::Error::other(format!("GET {path}: HTTP {status}: {error}")));
        }
        match response.get_mut("data") {
            Some(data) => Ok(data.take()),
            None => Err(bad_response("no `data`")),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this PID only; wait reaps it before the directory goes
        // (the TempDir drops after this).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `prometheus.yml` into `dir` and returns its path.
fn write_config(dir: &Path, targets: &[SocketAddr], rule_files: &[PathBuf]) -> io::Result<PathBuf> {
    let mut config = String::from(
        "# Written by depfence-integration's Prometheus harness.\n\
         global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n",
    );
    config.push_str("rule_files:\n");
    for file in rule_files {
        config.push_str(&format!("  - {}\n", yaml_quote(&file.display().to_string())));
    }
    config.push_str(&format!("scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets:\n"));
    for target in targets {
        config.push_str(&format!("          - {}\n", yaml_quote(&target.to_string())));
    }
    if targets.is_empty() {
        config.push_str("          []\n");
    }
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, config)?;
    Ok(path)
}

/// Starts the server on a free loopback port and waits for `/-/ready`. Fails with
/// `AddrInUse` when the port was taken in the meantime.
fn spawn_and_wait(binary: &Path, dir: &Path, config: &Path) -> io::Result<(Child, SocketAddr)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, crate::free_loopback_port()?));
    let log_path = dir.join("prometheus.log");
    let log = File::create(&log_path)?;
    let mut child = Command::new(binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={addr}"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let kind =
                if log.contains("address already in use") { io::ErrorKind::AddrInUse } else { io::ErrorKind::Other };
            return Err(io::Error::new(kind, format!("prometheus exited ({status}):\n{}", tail(&log, 30))));
        }
        if matches!(http_get(addr, "/-/ready"), Ok((200, _))) {
            return Ok((child, addr));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("prometheus not ready after {READY_TIMEOUT:?}:\n{}", tail(&log, 30)),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn yaml_quote(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The last `lines` lines of a text.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all.get(all.len().saturating_sub(lines)..).unwrap_or_default().join("\n")
}

fn bad_response(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("unexpected Prometheus response: {what}"))
}

/// Reads a JSON object of strings (`metric`, `labels`, `annotations`).
fn labels(json: Option<&Value>) -> io::Result<Labels> {
    serde_json::from_value(json.cloned().unwrap_or_default()).map_err(|e| bad_response(&format!("labels: {e}")))
}

/// Reads a `[timestamp, "value"]` pair.
fn sample_value(json: Option<&Value>) -> io::Result<f64> {
    let (_time, value): (f64, String) =
        serde_json::from_value(json.cloned().unwrap_or_default()).map_err(|e| bad_response(&format!("sample: {e}")))?;
    parse_float(&value)
}

/// Parses a value as Prometheus formats it (`1`, `0.5`, `1e+06`, `NaN`, `+Inf`, `-Inf`: Rust's
/// float syntax accepts all of them).
fn parse_float(text: &str) -> io::Result<f64> {
    text.parse().map_err(|_| bad_response(&format!("not a number: {text:?}")))
}

/// Percent-encodes a query parameter (everything but RFC 3986 unreserved characters).
fn percent_encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// One HTTP/1.0 GET; returns the status code and the body. HTTP/1.0 keeps the server from
/// chunking the body: it sends it as it is and closes the connection.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    parse_response(&response)
}

/// Splits an HTTP/1.0 response (read until the server closed) into its status code and body.
fn parse_response(response: &[u8]) -> io::Result<(u16, Vec<u8>)> {
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed HTTP response");
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(malformed)?;
    let status_line = response.split(|&b| b == b'\r').next().unwrap_or_default();
    let status = std::str::from_utf8(status_line).ok().and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
    let body = response.get(split + 4..).unwrap_or_default();
    Ok((status.ok_or_else(malformed)?, body.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_samples_and_labels() {
        let item: Value =
            serde_json::from_str(r#"{"metric":{"job":"depfence","a":"\"q\" \u00e9"},"value":[1700000000.5,"+Inf"]}"#)
                .unwrap();
        let metric = labels(item.get("metric")).unwrap();
        assert_eq!((metric.get("job").unwrap().as_str(), metric.get("a").unwrap().as_str()), ("depfence", "\"q\" é"));
        assert_eq!(sample_value(item.get("value")).unwrap(), f64::INFINITY);
        assert!(parse_float("NaN").unwrap().is_nan());
        assert_eq!(parse_float("1e+06").unwrap(), 1e6);
        assert!(labels(Some(&serde_json::json!({"a": 1}))).is_err());
        assert!(labels(None).is_err());
        assert!(sample_value(Some(&serde_json::json!([1, 2]))).is_err());
    }

    #[test]
    fn parses_http_responses() {
        let plain = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close";
        assert_eq!(parse_response(plain).unwrap(), (200, b"until close".to_vec()));
        assert_eq!(parse_response(b"HTTP/1.0 400 Bad Request\r\n\r\n").unwrap(), (400, Vec::new()));
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.0 OK\r\n\r\n").is_err());
    }

    #[test]
    fn encodes_queries() {
        assert_eq!(percent_encode(r#"up{job="depfence"} == 1"#), "up%7Bjob%3D%22depfence%22%7D%20%3D%3D%201");
        assert_eq!(percent_encode("rate(x[1m])"), "rate%28x%5B1m%5D%29");
    }
}
