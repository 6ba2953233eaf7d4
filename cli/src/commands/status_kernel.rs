//! `policyctl status --kernel`: what depfence has loaded, attached and pinned in the kernel — per pin
//! root its maps with fill levels, its links with their programs and cgroups, the registered
//! cgroups with their counters, and the global counters. Read-only; mounts nothing.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use depfence::datapath::status::{self, CgroupStatus, LinkStatus, MapStatus, RootStatus, Status};

use crate::args::Output;
use crate::error::CliError;

/// Prints the status of one pin root (`--pins DIR`) or of every pin root under bpffs.
pub fn run(pins: Option<&Path>, output: Output) -> Result<ExitCode, CliError> {
    let status = status::status(pins)?;
    if status.roots.is_empty() {
        eprintln!("{}", nothing_pinned(&status));
    }
    let mut out = std::io::stdout().lock();
    match output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut out, &status).map_err(std::io::Error::from)?;
            writeln!(out)?;
        }
        Output::Text => out.write_all(render(&status).as_bytes())?,
    }
    Ok(ExitCode::SUCCESS)
}

fn nothing_pinned(status: &Status) -> String {
    if status.bpffs.is_empty() {
        return "depfence has nothing pinned: no bpffs is mounted".to_owned();
    }
    let mounts: Vec<String> = status.bpffs.iter().map(|m| m.display().to_string()).collect();
    format!("depfence has nothing pinned: no `depfence*` pin root under {}", mounts.join(", "))
}

/// The text form: one block per pin root.
fn render(status: &Status) -> String {
    let mut text = String::new();
    for (i, root) in status.roots.iter().enumerate() {
        if i > 0 {
            text.push('\n');
        }
        render_root(&mut text, root, status.bpf_stats_enabled.unwrap_or(false));
    }
    text
}

fn render_root(text: &mut String, root: &RootStatus, stats_enabled: bool) {
    let abi = if root.abi_supported {
        format!("ABI {}", root.abi_version)
    } else {
        format!("ABI {} (unknown)", root.abi_version)
    };
    let _ = writeln!(text, "{}  {abi}  memlock {}", root.root.display(), bytes(root.memlock_bytes()));

    let _ = writeln!(text, "  maps");
    let rows: Vec<Vec<String>> = root.maps.iter().map(map_row).collect();
    table(text, "    ", &rows, &[Align::Left, Align::Left, Align::Right, Align::Left, Align::Right, Align::Right]);

    if root.links.is_empty() {
        let _ = writeln!(text, "  links: none (nothing attached)");
    } else {
        let note = if stats_enabled { "" } else { " (run counts need sysctl kernel.bpf_stats_enabled=1)" };
        let _ = writeln!(text, "  links{note}");
        let rows: Vec<Vec<String>> = root.links.iter().map(|l| link_row(l, stats_enabled)).collect();
        table(text, "    ", &rows, &[Align::Left, Align::Left, Align::Left, Align::Left, Align::Left]);
    }

    if root.abi_supported {
        if root.cgroups.is_empty() {
            let _ = writeln!(text, "  cgroups: none registered");
        } else {
            let _ = writeln!(text, "  cgroups");
            for cgroup in &root.cgroups {
                render_cgroup(text, cgroup);
            }
        }
    }
    if let Some(g) = &root.globals {
        let _ = write!(
            text,
            "  events: {} dropped (ring buffer full), {} deduplicated",
            g.events_dropped, g.events_deduped
        );
        if let Some(c) = &root.config {
            let _ = write!(text, " (window {})", duration(c.dedup_window_ns));
        }
        let _ = writeln!(text);
        let _ = writeln!(
            text,
            "  hooks: {} runs outside registered cgroups, {} with a bad counter slot",
            g.unregistered, g.bad_slot
        );
    }
    for warning in &root.warnings {
        let _ = writeln!(text, "  warning: {warning}");
    }
}

fn map_row(m: &MapStatus) -> Vec<String> {
    let (used, max) = match (m.entries, m.map_type.as_str()) {
        (_, "ringbuf") => ("-".to_owned(), bytes(u64::from(m.max_entries))),
        (Some(n), _) => (n.to_string(), m.max_entries.to_string()),
        (None, _) => ("-".to_owned(), m.max_entries.to_string()),
    };
    let fill = m.fill.map(|f| format!("({})", percent(f, m.entries.unwrap_or(0)))).unwrap_or_default();
    let memory = m.memlock_bytes.map(bytes).unwrap_or_default();
    vec![m.name.clone(), m.map_type.clone(), used, format!("/ {max}"), fill, memory]
}

fn link_row(l: &LinkStatus, stats_enabled: bool) -> Vec<String> {
    let hook = l.attach_type.clone().unwrap_or_else(|| l.link_type.clone());
    let id = l.cgroup_id.map_or_else(|| "?".to_owned(), |id| id.to_string());
    let target = match (&l.cgroup_path, l.attached) {
        (Some(path), true) => format!("→ {} (cgroup {id})", path.display()),
        (None, true) => format!("→ cgroup {id} (path not found)"),
        (_, false) => format!("→ cgroup {id} (removed; link detached)"),
    };
    let name = l.program.name.as_deref().unwrap_or("?");
    let program = format!("prog {} {name}", l.program.id);
    let runs = match (stats_enabled, l.program.run_count, l.program.run_time_ns) {
        (true, Some(count), Some(ns)) if count > 0 => format!("{count} runs, {} ns/run", ns / count),
        (true, Some(count), _) => format!("{count} runs"),
        _ => String::new(),
    };
    vec![hook, target, program, format!("link {}", l.link_id), runs]
}

fn render_cgroup(text: &mut String, c: &CgroupStatus) {
    let place = match &c.path {
        Some(path) => format!("{} (cgroup {})", path.display(), c.id),
        None => format!("cgroup {} (removed)", c.id),
    };
    let _ = write!(text, "    {place}  {}  ruleset {}", c.mode, c.ruleset);
    if let Some(candidate) = c.candidate_ruleset {
        let _ = write!(text, "  candidate {candidate}");
    }
    let _ = write!(text, "  generation {}  slot {}", c.generation, c.counter_slot);
    if !c.flags.is_empty() {
        let _ = write!(text, "  flags {}", c.flags.join(","));
    }
    let _ = writeln!(text);
    match &c.counters {
        Some(counts) => {
            let cells: Vec<String> = counts.iter().map(|(verdict, n)| format!("{} {n}", verdict.phrase())).collect();
            let _ = writeln!(text, "      {}", cells.join("  "));
        }
        None => {
            let _ = writeln!(text, "      counters unreadable (slot {} out of range?)", c.counter_slot);
        }
    }
}

#[derive(Clone, Copy)]
enum Align {
    Left,
    Right,
}

/// Appends `rows` as columns separated by two spaces, each as wide as its widest cell; empty
/// trailing cells leave no trailing spaces.
fn table(text: &mut String, indent: &str, rows: &[Vec<String>], align: &[Align]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let mut line = indent.to_owned();
        for (c, cell) in row.iter().enumerate() {
            let width = widths.get(c).copied().unwrap_or(0);
            if c > 0 {
                line.push_str("  ");
            }
            match align.get(c).copied().unwrap_or(Align::Left) {
                Align::Left => {
                    let _ = write!(line, "{cell:<width$}");
                }
                Align::Right => {
                    let _ = write!(line, "{cell:>width$}");
                }
            }
        }
        let _ = writeln!(text, "{}", line.trim_end());
    }
}

/// A fill ratio as a percentage; a non-empty map never shows as 0.0%.
fn percent(fill: f64, entries: u64) -> String {
    let pct = fill * 100.0;
    if entries > 0 && pct < 0.05 { "<0.1%".to_owned() } else { format!("{pct:.1}%") }
}

/// Bytes in binary units.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = "KiB";
    for next in UNITS.iter().skip(1) {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    format!("{value:.1} {unit}")
}

/// Nanoseconds in the largest whole unit (`0` is "off").
fn duration(ns: u64) -> String {
    match ns {
        0 => "off".to_owned(),
        n if n % 1_000_000_000 == 0 => format!("{}s", n / 1_000_000_000),
        n if n % 1_000_000 == 0 => format!("{}ms", n / 1_000_000),
        n if n % 1_000 == 0 => format!("{}µs", n / 1_000),
        n => format!("{n}ns"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests fail by panicking")]

    use std::path::PathBuf;

    use depfence::datapath::status::{ConfigStatus, GlobalCounters, ProgramStatus};
    use depfence::verdict::Counts;

    use super::*;

    fn map(name: &str, map_type: &str, entries: Option<u64>, max: u32, memlock: u64) -> MapStatus {
        MapStatus {
            name: name.into(),
            id: 1,
            map_type: map_type.into(),
            key_size: 4,
            value_size: 4,
            max_entries: max,
            entries,
            fill: entries.map(|n| status::fill_ratio(n, max)),
            memlock_bytes: Some(memlock),
        }
    }

    fn sample(stats: bool) -> Status {
        let cgroup = PathBuf::from("/sys/fs/cgroup/unified/depfence-run-42");
        let link = |hook: &str, id: u32| LinkStatus {
            pin: PathBuf::from(format!("/sys/fs/bpf/depfence-run-42/links/df_{hook}-7853")),
            link_id: id,
            link_type: "cgroup".into(),
            attach_type: Some(hook.into()),
            program: ProgramStatus {
                id: id + 1000,
                name: Some(format!("df_{hook}")),
                run_count: Some(4),
                run_time_ns: Some(1000),
            },
            cgroup_id: Some(7853),
            cgroup_path: Some(cgroup.clone()),
            cgroup_exists: true,
            attached: true,
        };
        let mut gone = link("sendmsg6", 9);
        gone.attached = false;
        gone.cgroup_exists = false;
        gone.cgroup_path = None;
        Status {
            bpffs: vec![PathBuf::from("/sys/fs/bpf")],
            cgroup2: Some(PathBuf::from("/sys/fs/cgroup/unified")),
            bpf_stats_enabled: Some(stats),
            roots: vec![RootStatus {
                root: PathBuf::from("/sys/fs/bpf/depfence-run-42"),
                abi_version: 1,
                abi_supported: true,
                maps: vec![
                    map("DF_CGROUPS", "hash", Some(1), 16_384, 1_377_280),
                    map("DF_RULES", "hash", Some(12), 2_097_152, 33_555_416),
                    map("DF_EVENTS", "ringbuf", None, 262_144, 270_336),
                    map("DF_META", "array", None, 1, 512),
                ],
                links: vec![link("connect4", 7), gone],
                cgroups: vec![CgroupStatus {
                    id: 7853,
                    path: Some(cgroup.clone()),
                    exists: true,
                    mode: "enforce".into(),
                    ruleset: 1,
                    candidate_ruleset: Some(2),
                    generation: 3,
                    flags: vec!["active_has_cidr".into()],
                    counter_slot: 0,
                    counters: Some(Counts { allowed: 5, would_reject: 0, rejected: 2, candidate_would_reject: 1 }),
                }],
                globals: Some(GlobalCounters { events_dropped: 0, events_deduped: 6, unregistered: 0, bad_slot: 0 }),
                config: Some(ConfigStatus { max_level: 1, dedup_window_ns: 1_000_000_000 }),
                warnings: vec!["something to look at".into()],
            }],
        }
    }

    #[test]
    fn text_has_aligned_maps_links_cgroups_and_counters() {
        let text = render(&sample(true));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "/sys/fs/bpf/depfence-run-42  ABI 1  memlock 33.6 MiB");
        assert_eq!(lines[1], "  maps");
        assert_eq!(lines[2], "    DF_CGROUPS  hash      1  / 16384      (<0.1%)    1.3 MiB");
        assert_eq!(lines[3], "    DF_RULES    hash     12  / 2097152    (<0.1%)   32.0 MiB");
        assert_eq!(lines[4], "    DF_EVENTS   ringbuf   -  / 256.0 KiB           264.0 KiB");
        assert_eq!(lines[5], "    DF_META     array     -  / 1                       512 B");
        assert_eq!(lines[6], "  links");
        assert_eq!(
            lines[7],
            "    connect4  → /sys/fs/cgroup/unified/depfence-run-42 (cgroup 7853)  prog 1007 df_connect4  link 7  4 runs, 250 ns/run"
        );
        assert_eq!(
            lines[8],
            "    sendmsg6  → cgroup 7853 (removed; link detached)                  prog 1009 df_sendmsg6  link 9  4 runs, 250 ns/run"
        );
        assert_eq!(lines[9], "  cgroups");
        assert_eq!(
            lines[10],
            "    /sys/fs/cgroup/unified/depfence-run-42 (cgroup 7853)  enforce  ruleset 1  candidate 2  generation 3  slot 0  flags active_has_cidr"
        );
        assert_eq!(lines[11], "      allowed 5  would-reject 0  rejected 2  candidate-would-reject 1");
        assert_eq!(lines[12], "  events: 0 dropped (ring buffer full), 6 deduplicated (window 1s)");
        assert_eq!(lines[13], "  hooks: 0 runs outside registered cgroups, 0 with a bad counter slot");
        assert_eq!(lines[14], "  warning: something to look at");
        assert_eq!(lines.len(), 15);
    }

    #[test]
    fn run_counts_are_hidden_while_bpf_stats_are_off() {
        let text = render(&sample(false));
        assert!(text.contains("  links (run counts need sysctl kernel.bpf_stats_enabled=1)\n"), "{text}");
        assert!(!text.contains("runs,"), "{text}");
    }

    #[test]
    fn nothing_pinned_says_where_it_looked() {
        let mut status = sample(true);
        status.roots.clear();
        assert_eq!(nothing_pinned(&status), "depfence has nothing pinned: no `depfence*` pin root under /sys/fs/bpf");
        assert_eq!(render(&status), "");
        status.bpffs.clear();
        assert_eq!(nothing_pinned(&status), "depfence has nothing pinned: no bpffs is mounted");
    }

    #[test]
    fn units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.0 KiB");
        assert_eq!(bytes(33_555_416), "32.0 MiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(percent(0.0, 0), "0.0%");
        assert_eq!(percent(12.0 / 2_097_152.0, 12), "<0.1%");
        assert_eq!(percent(0.5, 8), "50.0%");
        assert_eq!(percent(1.0, 16_384), "100.0%");
        assert_eq!(duration(0), "off");
        assert_eq!(duration(1_000_000_000), "1s");
        assert_eq!(duration(250_000_000), "250ms");
        assert_eq!(duration(1_500), "1500ns");
    }
}
