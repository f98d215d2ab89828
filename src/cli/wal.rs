//! `tickvault wal summary | dump | check`: read-only inspection, safe beside a running daemon.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;
use tickvault_wal::{Lane, RecordKind, Wal};

use crate::event::{Event, EVENT_KIND, SYNTHETIC_KIND};
use crate::synthetic;

fn open(data_dir: &Path) -> anyhow::Result<tickvault_wal::LogReader> {
    Ok(Wal::open_read_only(data_dir)?)
}

pub fn summary(data_dir: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let summary = open(data_dir)?.summary()?;
    let mut out = std::io::stdout().lock();
    if as_json {
        let mut value = serde_json::to_value(&summary)?;
        value["data_dir"] = json!(data_dir.display().to_string());
        writeln!(out, "{value}")?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "log {} (format {})", data_dir.display(), summary.format_version)?;
    writeln!(
        out,
        "{:<9} {:>12} {:>12} {:>12} {:>12}",
        "lane", "first", "last", "records", "bytes"
    )?;
    let seq = |s: Option<u64>| s.map_or_else(|| "-".to_owned(), |s| s.to_string());
    for lane in &summary.lanes {
        writeln!(
            out,
            "{:<9} {:>12} {:>12} {:>12} {:>12}",
            lane.lane.name(),
            seq(lane.first_seq),
            seq(lane.last_seq),
            lane.records,
            human_bytes(lane.bytes)
        )?;
    }
    if summary.cursors.is_empty() {
        writeln!(out, "cursors: none")?;
    } else {
        writeln!(out, "cursors:")?;
        for c in &summary.cursors {
            writeln!(out, "  {:<24} {:<9} {:>12}", c.sink, c.lane.name(), c.seq)?;
        }
    }
    writeln!(out, "quarantined: {}", summary.quarantined)?;
    Ok(ExitCode::SUCCESS)
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The JSON form of one stored payload, by kind.
fn payload_json(kind: RecordKind, payload: &[u8]) -> serde_json::Value {
    match kind {
        EVENT_KIND => match Event::from_payload(payload) {
            Ok(event) => json!({ "event": event, "natural_key": event.natural_key().to_string() }),
            Err(e) => json!({ "payload_error": e.to_string(), "payload_len": payload.len() }),
        },
        SYNTHETIC_KIND => match synthetic::verify(payload) {
            Ok(id) => json!({ "synthetic": id, "payload_len": payload.len() }),
            Err(e) => json!({ "payload_error": e, "payload_len": payload.len() }),
        },
        _ => json!({ "payload_len": payload.len() }),
    }
}

pub fn dump(data_dir: &Path, lane: Lane, from: u64, to: u64) -> anyhow::Result<ExitCode> {
    let reader = open(data_dir)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut write_error = None;
    reader.scan(lane, from, to, |seq, decoded| {
        let mut line = match decoded {
            Ok(record) => {
                let mut v = payload_json(record.kind, record.payload);
                v["kind"] = json!(record.kind.0);
                v
            }
            Err(error) => json!({ "corrupt": error.to_string() }),
        };
        line["lane"] = json!(lane.name());
        line["seq"] = json!(seq);
        match writeln!(out, "{line}") {
            Ok(()) => true,
            Err(e) => {
                write_error = Some(e);
                false
            }
        }
    })?;
    match write_error {
        // A closed pipe (`| head`) is a normal end for a dump.
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
        Some(e) => return Err(e).context("writing the dump"),
        None => {}
    }
    match out.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing the dump"),
        _ => Ok(ExitCode::SUCCESS),
    }
}

pub fn check(data_dir: &Path) -> anyhow::Result<ExitCode> {
    let reader = open(data_dir)?;
    let report = reader.check()?;
    let mut out = std::io::stdout().lock();
    for c in &report.corrupt {
        writeln!(out, "corrupt {} {}: {}", c.lane.name(), c.seq, c.error)?;
    }
    for (lane, first, last) in &report.missing {
        writeln!(out, "missing {} {}..={}", lane.name(), first, last)?;
    }
    writeln!(
        out,
        "checked {} records: {} good, {} corrupt, {} missing ranges",
        report.good + report.corrupt.len() as u64,
        report.good,
        report.corrupt.len(),
        report.missing.len()
    )?;
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
