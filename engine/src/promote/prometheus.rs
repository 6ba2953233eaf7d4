//! The Prometheus HTTP API as the fleet gate's [`Metrics`] source: instant queries
//! (`/api/v1/query`) at a pinned time, and the retention (`/api/v1/status/runtimeinfo`), over
//! a maintained HTTP client (ureq) with a timeout and optional bearer or basic authentication.
//! Thanos, Mimir and VictoriaMetrics answer the same API.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Deserialize;

use super::fleet::{Answer, FetchError, Metrics, Series};

/// How to authenticate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Auth {
    /// No `Authorization` header.
    #[default]
    None,
    /// `Authorization: Bearer TOKEN`.
    Bearer(String),
    /// `Authorization: Basic …`.
    Basic {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
}

/// A Prometheus server.
pub struct Prometheus {
    base: String,
    agent: ureq::Agent,
    authorization: Option<String>,
}

#[derive(Deserialize)]
struct Envelope<T> {
    status: String,
    data: Option<T>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    warnings: Vec<String>,
}

#[derive(Deserialize)]
struct QueryData {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct RawSeries {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    #[serde(default)]
    value: Option<(f64, String)>,
    #[serde(default)]
    values: Vec<(f64, String)>,
}

#[derive(Deserialize)]
struct RuntimeInfo {
    #[serde(rename = "storageRetention", default)]
    storage_retention: String,
}

impl Prometheus {
    /// A client of the server at `url` (`http://host:9090`, or a path prefix behind a proxy),
    /// giving up on any request after `timeout`.
    pub fn new(url: &str, auth: Auth, timeout: Duration) -> Prometheus {
        let agent: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build().into();
        let authorization = match auth {
            Auth::None => None,
            Auth::Bearer(token) => Some(format!("Bearer {}", token.trim())),
            Auth::Basic { user, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", password.trim_end_matches('\n')))
            )),
        };
        Prometheus { base: url.trim_end_matches('/').to_owned(), agent, authorization }
    }

    fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<(T, Vec<String>), FetchError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.agent.get(&url);
        for (name, value) in query {
            request = request.query(name, value);
        }
        if let Some(authorization) = &self.authorization {
            request = request.header("Authorization", authorization);
        }
        let mut response = request.call().map_err(|e| FetchError(format!("{url}: {e}")))?;
        let status = response.status();
        let body = response.body_mut().read_to_string().map_err(|e| FetchError(format!("{url}: {e}")))?;
        let envelope: Envelope<T> = serde_json::from_str(&body).map_err(|e| {
            FetchError(format!(
                "{url}: HTTP {status}, not an API answer ({e}): {}",
                body.chars().take(200).collect::<String>()
            ))
        })?;
        if envelope.status != "success" {
            return Err(FetchError(format!(
                "{url}: HTTP {status}, {}: {}",
                envelope.error_type.unwrap_or_default(),
                envelope.error.unwrap_or_default()
            )));
        }
        let data = envelope.data.ok_or_else(|| FetchError(format!("{url}: an answer without data")))?;
        Ok((data, envelope.warnings))
    }
}

impl Metrics for Prometheus {
    fn query(&self, promql: &str, time: SystemTime) -> Result<Answer, FetchError> {
        let time = time.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let (data, warnings): (QueryData, _) =
            self.get("/api/v1/query", &[("query", promql), ("time", &format!("{time:.3}"))])?;
        let parse = |v: &str| v.parse::<f64>().map_err(|_| FetchError(format!("not a sample value: {v}")));
        let series = match data.result_type.as_str() {
            "vector" | "matrix" => {
                let raw: Vec<RawSeries> =
                    serde_json::from_value(data.result).map_err(|e| FetchError(format!("unexpected result: {e}")))?;
                raw.into_iter()
                    .map(|s| {
                        let samples = s
                            .value
                            .into_iter()
                            .chain(s.values)
                            .map(|(t, v)| Ok((t, parse(&v)?)))
                            .collect::<Result<Vec<_>, FetchError>>()?;
                        Ok(Series { labels: s.metric, samples })
                    })
                    .collect::<Result<Vec<_>, FetchError>>()?
            }
            other => return Err(FetchError(format!("unexpected result type `{other}` for `{promql}`"))),
        };
        Ok(Answer { series, warnings })
    }

    fn retention(&self) -> Result<Option<Duration>, FetchError> {
        let (info, _): (RuntimeInfo, _) = self.get("/api/v1/status/runtimeinfo", &[])?;
        Ok(retention_time(&info.storage_retention))
    }
}

/// The time part of Prometheus's `storageRetention` (`15d`, `1h`, `10GiB or 30d`); None when
/// it has none (retention by size only).
pub fn retention_time(text: &str) -> Option<Duration> {
    text.split(" or ").find_map(|part| humantime::parse_duration(part.trim()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_texts() {
        assert_eq!(retention_time("15d"), Some(Duration::from_secs(15 * 86_400)));
        assert_eq!(retention_time("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(retention_time("10GiB or 2w"), Some(Duration::from_secs(14 * 86_400)));
        assert_eq!(retention_time("10GiB"), None);
        assert_eq!(retention_time(""), None);
    }
}
