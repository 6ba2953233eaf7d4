//! A real Prometheus server for end-to-end tests of the agent's metrics and the shipped alert
//! rules (`deploy/prometheus/depfence-alerts.yml`).
//!
//! [`Prometheus::start`] writes a configuration that scrapes the given targets every second as
//! job `depfence` and evaluates the alert rules every second, starts the `prometheus` binary
//! (Debian's package `prometheus`) on a free loopback port with its storage in a temporary
//! directory, and waits until it is ready. Dropping it kills that one process (by its PID) and
//! removes the directory. Queries go through the HTTP API with a minimal HTTP/1.1 client over
//! [`TcpStream`] and a minimal JSON reader, so the harness needs no crates.
//!
//! No privileges are needed. [`require_tool`] skips a test with a reason when the binary is
//! missing, and fails it instead under CI (`CI=true`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// Finds an executable on `PATH`.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|file| file.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The path of `tool` when it is installed. Otherwise prints why `test` skips and returns None;
/// under CI (`CI=true`) a skip is a failure, so it panics instead. `scripts/setup` installs
/// `promtool` and `prometheus` (Debian package `prometheus`).
pub fn require_tool(test: &str, tool: &str) -> Option<PathBuf> {
    if let Some(path) = find_tool(tool) {
        return Some(path);
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let why = format!("`{tool}` is not installed (apt-get install prometheus, or run scripts/setup)");
    assert!(!in_ci, "{test}: cannot run in CI: {why}");
    eprintln!("skipping {test}: {why}");
    None
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
    dir: PathBuf,
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
        let dir = std::env::temp_dir().join(crate::unique_name("depfence-prometheus"));
        std::fs::create_dir(&dir)?;
        let started = write_config(&dir, targets, rule_files).and_then(|config| {
            let mut last = io::Error::other("no attempt made");
            for _ in 0..3 {
                match spawn_and_wait(&binary, &dir, &config) {
                    Ok(server) => return Ok(server),
                    // Another process took the port between choosing and binding it: retry.
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = e,
                    Err(e) => return Err(e),
                }
            }
            Err(last)
        });
        match started {
            Ok((child, addr)) => Ok(Prometheus { child, dir, addr }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
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
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Evaluates an instant query now. A scalar comes back as one sample without labels; a
    /// range vector is an error.
    pub fn query(&self, promql: &str) -> io::Result<Vec<Sample>> {
        let data = self.api(&format!("/api/v1/query?query={}", percent_encode(promql)))?;
        let result = data.get("result").ok_or_else(|| bad_response("no `result`"))?;
        match data.get("resultType").and_then(Json::as_str) {
            Some("vector") => {
                let items = result.as_array().ok_or_else(|| bad_response("`result` is not an array"))?;
                items
                    .iter()
                    .map(|item| {
                        let labels = labels(item.get("metric"))?;
                        Ok((labels, sample_value(item.get("value"))?))
                    })
                    .collect()
            }
            Some("scalar") => Ok(vec![(Labels::new(), sample_value(Some(result))?)]),
            other => Err(bad_response(&format!("query {promql:?}: unsupported result type {other:?}"))),
        }
    }

    /// The alerts that are pending or firing now.
    pub fn alerts(&self) -> io::Result<Vec<Alert>> {
        let data = self.api("/api/v1/alerts")?;
        let alerts = data.get("alerts").and_then(Json::as_array).ok_or_else(|| bad_response("no `alerts`"))?;
        alerts
            .iter()
            .map(|alert| {
                let value = match alert.get("value").and_then(Json::as_str) {
                    Some(text) => parse_float(text)?,
                    None => f64::NAN,
                };
                Ok(Alert {
                    labels: labels(alert.get("labels"))?,
                    annotations: labels(alert.get("annotations"))?,
                    state: alert.get("state").and_then(Json::as_str).unwrap_or_default().to_owned(),
                    value,
                })
            })
            .collect()
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
    fn api(&self, path: &str) -> io::Result<Json> {
        let (status, body) = http_get(self.addr, path)?;
        let text = String::from_utf8(body).map_err(|_| bad_response("body is not UTF-8"))?;
        let json = Json::parse(&text).map_err(|e| bad_response(&format!("{path}: {e}: {text}")))?;
        if status != 200 || json.get("status").and_then(Json::as_str) != Some("success") {
            let error = json.get("error").and_then(Json::as_str).unwrap_or("no error message");
            return Err(io::Error::other(format!("GET {path}: HTTP {status}: {error}")));
        }
        json.get("data").cloned().ok_or_else(|| bad_response("no `data`"))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this PID only; wait reaps it before the directory goes.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
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
    let addr = free_port()?;
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

/// A loopback address whose port was free a moment ago.
fn free_port() -> io::Result<SocketAddr> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()
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
fn labels(json: Option<&Json>) -> io::Result<Labels> {
    let Some(Json::Object(fields)) = json else { return Err(bad_response("labels are not an object")) };
    fields
        .iter()
        .map(|(name, value)| match value {
            Json::String(value) => Ok((name.clone(), value.clone())),
            _ => Err(bad_response("a label value is not a string")),
        })
        .collect()
}

/// Reads a `[timestamp, "value"]` pair.
fn sample_value(json: Option<&Json>) -> io::Result<f64> {
    let pair = json.and_then(Json::as_array).ok_or_else(|| bad_response("a sample is not an array"))?;
    let text = pair.get(1).and_then(Json::as_str).ok_or_else(|| bad_response("a sample has no value"))?;
    parse_float(text)
}

/// Parses a value as Prometheus formats it (`1`, `0.5`, `1e+06`, `NaN`, `+Inf`, `-Inf`).
fn parse_float(text: &str) -> io::Result<f64> {
    match text {
        "NaN" => Ok(f64::NAN),
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => text.parse().map_err(|_| bad_response(&format!("not a number: {text:?}"))),
    }
}

/// Percent-encodes a query parameter (everything but RFC 3986 unreserved characters).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// One HTTP/1.1 GET with `Connection: close`; returns the status code and the body (chunked
/// transfer encoding decoded).
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    parse_response(&response)
}

fn parse_response(response: &[u8]) -> io::Result<(u16, Vec<u8>)> {
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed HTTP response");
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(malformed)?;
    let (head, body) = response.split_at(split);
    let body = body.get(4..).unwrap_or_default();
    let head = std::str::from_utf8(head).map_err(|_| malformed())?;
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok());
    let status = status.ok_or_else(malformed)?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
    }
    let body = if chunked {
        decode_chunked(body).ok_or_else(malformed)?
    } else if let Some(length) = length {
        body.get(..length).ok_or_else(malformed)?.to_vec()
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

fn decode_chunked(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_line = std::str::from_utf8(body.get(..line_end)?).ok()?;
        let size_text = size_line.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        let rest = body.get(line_end + 2..)?;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(rest.get(..size)?);
        body = rest.get(size + 2..)?;
    }
}

/// A JSON value: just enough JSON to read the Prometheus HTTP API.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// `null`
    Null,
    /// `true` or `false`
    Bool(bool),
    /// A number.
    Number(f64),
    /// A string.
    String(String),
    /// An array.
    Array(Vec<Json>),
    /// An object, fields in document order.
    Object(Vec<(String, Json)>),
}

impl Json {
    /// Parses a complete JSON document.
    pub fn parse(text: &str) -> Result<Json, String> {
        let mut reader = JsonReader { bytes: text.as_bytes(), at: 0 };
        let value = reader.value(0)?;
        reader.skip_space();
        if reader.at != reader.bytes.len() {
            return Err(format!("trailing characters at byte {}", reader.at));
        }
        Ok(value)
    }

    /// An object's field.
    pub fn get(&self, name: &str) -> Option<&Json> {
        match self {
            Json::Object(fields) => fields.iter().find(|(field, _)| field == name).map(|(_, value)| value),
            _ => None,
        }
    }

    /// A string's text.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(text) => Some(text),
            _ => None,
        }
    }

    /// An array's elements.
    pub fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Array(items) => Some(items),
            _ => None,
        }
    }
}

struct JsonReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl JsonReader<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn bump(&mut self) -> Result<u8, String> {
        let byte = self.peek().ok_or("unexpected end of JSON")?;
        self.at += 1;
        Ok(byte)
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.at += 1;
        }
    }

    fn expect(&mut self, word: &str) -> Result<(), String> {
        if self.bytes.get(self.at..self.at + word.len()) == Some(word.as_bytes()) {
            self.at += word.len();
            Ok(())
        } else {
            Err(format!("expected `{word}` at byte {}", self.at))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json, String> {
        if depth > 128 {
            return Err("JSON nested too deeply".to_owned());
        }
        self.skip_space();
        match self.peek().ok_or("unexpected end of JSON")? {
            b'n' => self.expect("null").map(|()| Json::Null),
            b't' => self.expect("true").map(|()| Json::Bool(true)),
            b'f' => self.expect("false").map(|()| Json::Bool(false)),
            b'"' => self.string().map(Json::String),
            b'[' => {
                self.at += 1;
                let mut items = Vec::new();
                self.skip_space();
                if self.peek() == Some(b']') {
                    self.at += 1;
                    return Ok(Json::Array(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.skip_space();
                    match self.bump()? {
                        b',' => continue,
                        b']' => return Ok(Json::Array(items)),
                        _ => return Err(format!("expected `,` or `]` at byte {}", self.at - 1)),
                    }
                }
            }
            b'{' => {
                self.at += 1;
                let mut fields = Vec::new();
                self.skip_space();
                if self.peek() == Some(b'}') {
                    self.at += 1;
                    return Ok(Json::Object(fields));
                }
                loop {
                    self.skip_space();
                    let name = self.string()?;
                    self.skip_space();
                    self.expect(":")?;
                    fields.push((name, self.value(depth + 1)?));
                    self.skip_space();
                    match self.bump()? {
                        b',' => continue,
                        b'}' => return Ok(Json::Object(fields)),
                        _ => return Err(format!("expected `,` or `}}` at byte {}", self.at - 1)),
                    }
                }
            }
            _ => self.number(),
        }
    }

    fn number(&mut self) -> Result<Json, String> {
        let start = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)) {
            self.at += 1;
        }
        let text = std::str::from_utf8(self.bytes.get(start..self.at).unwrap_or_default()).unwrap_or_default();
        text.parse().map(Json::Number).map_err(|_| format!("invalid JSON value at byte {start}"))
    }

    fn string(&mut self) -> Result<String, String> {
        if self.bump()? != b'"' {
            return Err(format!("expected a string at byte {}", self.at - 1));
        }
        let mut out = Vec::new();
        loop {
            match self.bump()? {
                b'"' => return String::from_utf8(out).map_err(|_| "string is not UTF-8".to_owned()),
                b'\\' => {
                    let escaped = match self.bump()? {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode_escape()?,
                        other => return Err(format!("invalid escape `\\{}`", char::from(other))),
                    };
                    let mut buf = [0; 4];
                    out.extend_from_slice(escaped.encode_utf8(&mut buf).as_bytes());
                }
                byte => out.push(byte),
            }
        }
    }

    /// The character of a `\uXXXX` escape (the `\u` already read), surrogate pairs joined.
    fn unicode_escape(&mut self) -> Result<char, String> {
        let high = self.hex4()?;
        let code = if (0xD800..0xDC00).contains(&high) {
            self.expect("\\u")?;
            let low = self.hex4()?;
            if !(0xDC00..0xE000).contains(&low) {
                return Err("unpaired surrogate in string".to_owned());
            }
            0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
        } else {
            high
        };
        char::from_u32(code).ok_or_else(|| "invalid \\u escape".to_owned())
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let digits = self.bytes.get(self.at..self.at + 4).ok_or("truncated \\u escape")?;
        let text = std::str::from_utf8(digits).map_err(|_| "invalid \\u escape")?;
        let code = u32::from_str_radix(text, 16).map_err(|_| "invalid \\u escape")?;
        self.at += 4;
        Ok(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_query_response() {
        let text = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"__name__":"up","job":"depfence","instance":"127.0.0.1:1"},"value":[1700000000.5,"1"]},
            {"metric":{"a":"\"q\" \\ \u00e9 \ud83d\ude00"},"value":[1,"+Inf"]}]}}"#;
        let json = Json::parse(text).unwrap();
        assert_eq!(json.get("status").and_then(Json::as_str), Some("success"));
        let result = json.get("data").and_then(|d| d.get("result")).and_then(Json::as_array).unwrap();
        assert_eq!(result.len(), 2);
        let first = labels(result[0].get("metric")).unwrap();
        assert_eq!(first["job"], "depfence");
        assert_eq!(sample_value(result[0].get("value")).unwrap(), 1.0);
        let second = labels(result[1].get("metric")).unwrap();
        assert_eq!(second["a"], "\"q\" \\ é 😀");
        assert_eq!(sample_value(result[1].get("value")).unwrap(), f64::INFINITY);
        assert_eq!(Json::parse("[1, -2.5e3, true, false, null, {}, []]").unwrap().as_array().unwrap().len(), 7);
        for bad in ["", "{", "[1,]", "{\"a\" 1}", "\"\\x\"", "tru", "1 2", "\"\\ud800\""] {
            assert!(Json::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_http_responses() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse_response(plain).unwrap(), (200, b"hello".to_vec()));
        let chunked =
            b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (400, b"hello world".to_vec()));
        let closed = b"HTTP/1.0 200 OK\r\n\r\nuntil close";
        assert_eq!(parse_response(closed).unwrap(), (200, b"until close".to_vec()));
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel").is_err());
    }

    #[test]
    fn encodes_queries() {
        assert_eq!(percent_encode(r#"up{job="depfence"} == 1"#), "up%7Bjob%3D%22depfence%22%7D%20%3D%3D%201");
        assert_eq!(percent_encode("rate(x[1m])"), "rate%28x%5B1m%5D%29");
    }
}
