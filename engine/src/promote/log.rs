//! The promotion log: every promotion and demotion, who made it, when, why and on what
//! evidence, one JSON line each.

use std::fs;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::gate::Evidence;
use super::store::{StoreError, append_text, lines_text};
use crate::timefmt::rfc3339;
use crate::verdict::Mode;

/// Who made a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// User name.
    pub user: String,
    /// User id.
    pub uid: u32,
}

/// One promotion or demotion of a service in one environment, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotionRecord {
    /// When.
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    /// The service.
    pub service: String,
    /// The environment (a change of several environments is one record each).
    pub environment: String,
    /// The effective mode before.
    pub from: Mode,
    /// The effective mode after.
    pub to: Mode,
    /// Who.
    pub who: Actor,
    /// Why (required with `forced`).
    pub reason: Option<String>,
    /// True when the gate refused and `--force` overrode it.
    pub forced: bool,
    /// The gate's refusal that `--force` overrode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overridden: Option<String>,
    /// The evidence the gate saw, if it ran.
    pub evidence: Option<Evidence>,
}

/// Appends a record to the log as one JSON line (creating the file with mode 0600, and its
/// directories with 0700), then syncs it.
pub fn append_log(path: &Path, record: &PromotionRecord) -> Result<(), StoreError> {
    let text = lines_text(std::slice::from_ref(record))
        .map_err(|source| StoreError::Write { path: path.to_owned(), source })?;
    append_text(path, &text)
}

/// Reads the log; a missing file is an empty log.
pub fn read_log(path: &Path) -> Result<Vec<PromotionRecord>, StoreError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(StoreError::Read { path: path.to_owned(), source }),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| StoreError::Parse { path: path.to_owned(), line: i + 1, source })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::promote::testing::*;

    #[test]
    fn records_go_to_the_log_one_line_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log/promotions.jsonl");
        let mut e = evidence(1234, 0);
        e.last_would_reject = Some(at(5));
        let record = PromotionRecord {
            time: UNIX_EPOCH + Duration::from_millis(1_750_000_000_123),
            service: "web".into(),
            environment: "prod".into(),
            from: Mode::Audit,
            to: Mode::Enforce,
            who: Actor { user: "alice".into(), uid: 1000 },
            reason: Some("clean for a week".into()),
            forced: false,
            overridden: None,
            evidence: Some(e),
        };
        append_log(&path, &record).unwrap();
        let forced = PromotionRecord { forced: true, overridden: Some("…".into()), evidence: None, ..record.clone() };
        append_log(&path, &forced).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(
            text.starts_with("{\"time\":\"2025-06-15T15:06:40.123Z\",\"service\":\"web\",\"environment\":\"prod\""),
            "{text}"
        );
        assert!(text.contains("\"who\":{\"user\":\"alice\",\"uid\":1000}"), "{text}");
        assert_eq!(read_log(&path).unwrap(), vec![record, forced]);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(read_log(&dir.path().join("none")).unwrap().is_empty());
    }
}
