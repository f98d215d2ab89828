//! `tickvault aggregate --config C [--data-dir DIR] --check [--json]`: makes the
//! derived lane again, in memory, from the aggregator's journal and the live and
//! backfill lanes, and compares it with the log's, record for record (read-only, beside
//! a running daemon too). Exit 0 when they are identical, 1 when a record differs or
//! is missing, 2 on bad input or when the inputs of the first round are gone.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::json;
use tickvault_wal::{Lane, LogReader, Record, Wal};

use crate::aggregate::{self, Spec};
use crate::event::Event;

#[derive(Clone, Debug, clap::Args)]
pub struct AggregateSpec {
    #[arg(long)]
    pub config: PathBuf,
    /// Overrides the config's `log.data_dir`.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Rebuild the derived lane in memory and compare it with the log's.
    #[arg(long, required = true)]
    pub check: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Reads a lane in order, a chunk at a time.
struct Follow<'a> {
    reader: &'a LogReader,
    lane: Lane,
    position: u64,
    buffered: VecDeque<Record>,
}

impl Follow<'_> {
    fn next(&mut self) -> anyhow::Result<Option<Record>> {
        if self.buffered.is_empty() {
            let batch = self.reader.read(self.lane, self.position, 10_000)?;
            self.position = batch.last_seq;
            self.buffered.extend(batch.records);
        }
        Ok(self.buffered.pop_front())
    }
}

/// The first difference found.
struct Difference {
    seq: u64,
    log: Option<String>,
    rebuilt: Option<String>,
}

fn describe(bytes: &[u8]) -> String {
    match Event::from_payload(bytes) {
        Ok(e) => format!("{e:?}"),
        Err(e) => format!("undecodable: {e}"),
    }
}

/// What [`check`] found.
pub struct Checked {
    pub rounds: u64,
    pub records: u64,
    pub revised: u64,
    difference: Option<Difference>,
}

impl Checked {
    pub fn identical(&self) -> bool {
        self.difference.is_none()
    }
}

/// Makes the derived lane of the log `reader` reads again from the journal (with
/// `config`'s timeframes) and compares it with the log's, record for record.
pub fn check(reader: &LogReader, config: &crate::config::AggregateConfig) -> anyhow::Result<Checked> {
    let journal = aggregate::journal(reader)?;
    for lane in [Lane::Live, Lane::Backfill, Lane::Derived] {
        if !journal.is_empty() && reader.first_retained(lane)? > 1 {
            return Err(super::BadInput(format!(
                "the {lane} lane was truncated: the aggregator's first rounds cannot be made again from this log"
            ))
            .into());
        }
    }
    let mut log = Follow {
        reader,
        lane: Lane::Derived,
        position: 0,
        buffered: VecDeque::new(),
    };
    let (mut records, mut revised, mut seq) = (0u64, 0u64, 0u64);
    let mut difference: Option<Difference> = None;
    let (_, last) = aggregate::replay(reader, Spec::from_config(config), |events| {
        for event in events {
            if difference.is_some() {
                return Ok(());
            }
            let rebuilt = event.to_payload()?;
            let ours = log.next()?;
            seq += 1;
            records += 1;
            revised += u64::from(aggregate::is_revision(&event));
            match ours {
                Some(r) if r.seq == seq && r.payload == rebuilt => {}
                other => {
                    difference = Some(Difference {
                        seq,
                        log: other.map(|r| format!("seq {}: {}", r.seq, describe(&r.payload))),
                        rebuilt: Some(describe(&rebuilt)),
                    })
                }
            }
        }
        Ok(())
    })?;
    if difference.is_none() {
        if let Some(extra) = log.next()? {
            difference = Some(Difference {
                seq: extra.seq,
                log: Some(format!("seq {}: {}", extra.seq, describe(&extra.payload))),
                rebuilt: None,
            });
        }
    }
    Ok(Checked {
        rounds: last.number,
        records,
        revised,
        difference,
    })
}

pub fn run(spec: &AggregateSpec) -> anyhow::Result<ExitCode> {
    let config = super::run::load_config(&spec.config, spec.data_dir.clone())?;
    let Checked {
        rounds,
        records,
        revised,
        difference,
    } = check(&Wal::open_read_only(&config.log.data_dir)?, &config.aggregate)?;
    if spec.json {
        let diff = difference
            .as_ref()
            .map(|d| json!({"seq": d.seq, "log": d.log, "rebuilt": d.rebuilt}));
        let out = json!({
            "rounds": rounds,
            "records": records,
            "revised": revised,
            "identical": difference.is_none(),
            "difference": diff,
        });
        println!("{out}");
    } else {
        match &difference {
            None => println!(
                "derived lane: {records} records ({revised} revisions) from {rounds} rounds; rebuilt from the journal: identical"
            ),
            Some(d) => {
                println!("derived lane: DIFFERS from its rebuild at seq {}", d.seq);
                println!("  log:     {}", d.log.as_deref().unwrap_or("(no record)"));
                println!("  rebuilt: {}", d.rebuilt.as_deref().unwrap_or("(no record)"));
            }
        }
    }
    Ok(if difference.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
