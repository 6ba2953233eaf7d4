//! What the CLI tests that read an exported SQLite file share.
#![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

use rusqlite::Connection;

/// The rows `sql` returns, each as its fields joined by `|`, NULL written `NULL`.
pub fn rows(db: &Connection, sql: &str) -> Vec<String> {
    let mut statement = db.prepare(sql).unwrap();
    let columns = statement.column_count();
    statement
        .query_map([], |row| {
            let fields: Vec<String> = (0..columns)
                .map(|i| match row.get::<_, rusqlite::types::Value>(i).unwrap() {
                    rusqlite::types::Value::Null => "NULL".to_owned(),
                    rusqlite::types::Value::Integer(n) => n.to_string(),
                    rusqlite::types::Value::Text(t) => t,
                    other => format!("{other:?}"),
                })
                .collect();
            Ok(fields.join("|"))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
}
