//! `tickvault export`: a range of the log as files an analyst loads (Parquet, CSV or
//! JSONL), from a log opened read-only: beside a running daemon (the export is the log
//! as of the moment it opened, a prefix of each lane) or on a copy from another box.
//!
//! Layout: one file per kind of event in the output directory, `quote.EXT`,
//! `trade.EXT`, `bar.EXT`, each with the columns of [`columns`]; the same columns in
//! every format. Memory stays constant whatever the range: Parquet is written a row
//! group at a time, CSV and JSONL a row at a time.

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::ValueEnum;
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int32Type, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::Type;
use tickvault_wal::{Lane, Wal};

use crate::event::{Body, Event, EventKind, Timeframe, EVENT_KIND};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Parquet,
    Csv,
    Jsonl,
}

impl Format {
    fn extension(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
        }
    }
}

/// What to export.
#[derive(Clone, Debug, clap::Args)]
pub struct ExportSpec {
    /// The log's directory (opened read-only).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// One lane (default: every lane).
    #[arg(long)]
    pub lane: Option<Lane>,
    /// One symbol, in any accepted form (`EUR/USD`, `C:EURUSD`, `BTC-USD`, `AAPL`).
    #[arg(long)]
    pub symbol: Option<String>,
    /// One kind of event.
    #[arg(long, value_parser = ["quote", "trade", "bar", "derived"])]
    pub kind: Option<String>,
    /// Events at or after this market time (`2025-03-01` in UTC, or RFC 3339).
    #[arg(long, value_parser = parse_instant)]
    pub from: Option<i64>,
    /// Events before this market time (`2025-03-02` in UTC, or RFC 3339).
    #[arg(long, value_parser = parse_instant)]
    pub to: Option<i64>,
    #[arg(long, value_enum)]
    pub format: Format,
    /// The directory the files go to (made if missing; files of the same name replaced).
    #[arg(long)]
    pub out: PathBuf,
}

/// A bar of records read, on standard error when it is a terminal (hidden otherwise):
/// `export`'s and `replay`'s.
pub fn records_bar(what: &str, total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let template = format!("{what} [{{bar:40}}] {{human_pos}}/{{human_len}} records {{per_sec}} (eta {{eta}})");
    bar.set_style(
        indicatif::ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// `2025-03-01` (midnight UTC) or an RFC 3339 instant, as Unix milliseconds.
pub fn parse_instant(s: &str) -> Result<i64, String> {
    if let Ok(date) = s.parse::<jiff::civil::Date>() {
        return date
            .to_zoned_datetime(jiff::tz::TimeZone::UTC)
            .map(|z| z.timestamp().as_millisecond())
            .map_err(|e| e.to_string());
    }
    s.parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .map_err(|_| format!("{s:?} is neither a date (2025-03-01) nor an RFC 3339 instant (2025-03-01T14:30:00Z)"))
}

/// The type of a column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ty {
    Text,
    Int64,
    UInt64,
    Int32,
    Float64,
    /// Unix milliseconds (Parquet `TIMESTAMP(MILLIS, true)`; RFC 3339 in CSV and JSONL).
    Millis,
    /// Unix nanoseconds (Parquet `TIMESTAMP(NANOS, true)`; RFC 3339 in CSV and JSONL).
    Nanos,
    /// A list of integers (a Parquet LIST; `1;2` in CSV, an array in JSONL).
    Ints,
}

struct Column {
    name: &'static str,
    ty: Ty,
    optional: bool,
}

const fn col(name: &'static str, ty: Ty) -> Column {
    Column {
        name,
        ty,
        optional: false,
    }
}

const fn opt(name: &'static str, ty: Ty) -> Column {
    Column {
        name,
        ty,
        optional: true,
    }
}

const QUOTE: &[Column] = &[
    col("lane", Ty::Text),
    col("seq", Ty::Int64),
    col("feed", Ty::Text),
    col("symbol", Ty::Text),
    col("ts", Ty::Millis),
    col("uid", Ty::UInt64),
    col("bid", Ty::Float64),
    col("ask", Ty::Float64),
    opt("bid_size", Ty::Float64),
    opt("ask_size", Ty::Float64),
    opt("exchange", Ty::Int32),
    col("captured_at", Ty::Nanos),
];

const TRADE: &[Column] = &[
    col("lane", Ty::Text),
    col("seq", Ty::Int64),
    col("feed", Ty::Text),
    col("symbol", Ty::Text),
    col("ts", Ty::Millis),
    col("uid", Ty::UInt64),
    col("price", Ty::Float64),
    col("size", Ty::Float64),
    opt("exchange", Ty::Int32),
    opt("trade_id", Ty::Text),
    col("conditions", Ty::Ints),
    col("captured_at", Ty::Nanos),
];

const BAR: &[Column] = &[
    col("lane", Ty::Text),
    col("seq", Ty::Int64),
    col("feed", Ty::Text),
    col("symbol", Ty::Text),
    col("timeframe", Ty::Text),
    col("start", Ty::Millis),
    col("open", Ty::Float64),
    col("high", Ty::Float64),
    col("low", Ty::Float64),
    col("close", Ty::Float64),
    col("volume", Ty::Float64),
    opt("vwap", Ty::Float64),
    opt("trades", Ty::UInt64),
    col("captured_at", Ty::Nanos),
];

/// A derived bar: a bar's columns, its version and its indicators.
const DERIVED: &[Column] = &[
    col("lane", Ty::Text),
    col("seq", Ty::Int64),
    col("feed", Ty::Text),
    col("symbol", Ty::Text),
    col("timeframe", Ty::Text),
    col("start", Ty::Millis),
    col("open", Ty::Float64),
    col("high", Ty::Float64),
    col("low", Ty::Float64),
    col("close", Ty::Float64),
    col("volume", Ty::Float64),
    col("version", Ty::UInt64),
    opt("sma20", Ty::Float64),
    opt("ema20", Ty::Float64),
    opt("rsi14", Ty::Float64),
    opt("macd", Ty::Float64),
    opt("macd_signal", Ty::Float64),
    opt("macd_hist", Ty::Float64),
    opt("bb_upper", Ty::Float64),
    opt("bb_middle", Ty::Float64),
    opt("bb_lower", Ty::Float64),
    opt("atr14", Ty::Float64),
    col("captured_at", Ty::Nanos),
];

/// The columns of a kind's file.
fn columns(kind: EventKind) -> &'static [Column] {
    match kind {
        EventKind::Quote => QUOTE,
        EventKind::Trade => TRADE,
        EventKind::Bar => BAR,
        EventKind::Derived => DERIVED,
    }
}

/// One value of a row; its column says its type.
#[derive(Clone, Copy, Debug)]
enum Cell<'a> {
    Null,
    Text(&'a str),
    Int(i64),
    UInt(u64),
    Float(f64),
    Ints(&'a [i32]),
    Frame(Timeframe),
}

/// The most columns a kind has.
const MAX_COLUMNS: usize = 23;
const _: () = assert!(
    QUOTE.len() <= MAX_COLUMNS
        && TRADE.len() <= MAX_COLUMNS
        && BAR.len() <= MAX_COLUMNS
        && DERIVED.len() <= MAX_COLUMNS
);

/// The cells of one event, in the order of [`columns`], into `row`; how many.
fn cells<'a>(lane: Lane, seq: u64, event: &'a Event, row: &mut [Cell<'a>; MAX_COLUMNS]) -> usize {
    use Cell::*;
    let mut out = Filler { row, len: 0 };
    let head = [
        Text(lane.name()),
        Int(seq as i64),
        Text(event.capture.feed.name()),
        Text(event.symbol()),
    ];
    out.extend(head);
    let opt_f = |v: Option<f64>| v.map_or(Null, Float);
    let opt_i = |v: Option<i32>| v.map_or(Null, |v| Int(v.into()));
    match &event.body {
        Body::Quote(q) => out.extend([
            Int(q.ts_ms),
            UInt(q.uid),
            Float(q.bid),
            Float(q.ask),
            opt_f(q.bid_size),
            opt_f(q.ask_size),
            opt_i(q.exchange),
        ]),
        Body::Trade(t) => out.extend([
            Int(t.ts_ms),
            UInt(t.uid),
            Float(t.price),
            Float(t.size),
            opt_i(t.exchange),
            t.trade_id.as_deref().map_or(Null, Text),
            Ints(&t.conditions),
        ]),
        Body::Bar(b) => {
            out.extend(bar_cells(b));
            out.extend([opt_f(b.vwap), b.trades.map_or(Null, UInt)]);
        }
        Body::Derived(d) => {
            out.extend(bar_cells(&d.bar));
            out.push(UInt(d.version.into()));
            out.extend(d.indicators.fields().map(|(_, v)| opt_f(v)));
        }
    }
    out.push(Int(event.capture.captured_at_ns));
    out.len
}

/// The cells a captured and a derived bar share: timeframe, start, prices, volume.
fn bar_cells(b: &crate::event::Bar) -> [Cell<'_>; 7] {
    use Cell::*;
    [
        Frame(b.timeframe),
        Int(b.start_ms),
        Float(b.open),
        Float(b.high),
        Float(b.low),
        Float(b.close),
        Float(b.volume),
    ]
}

/// Fills a row's cells in order.
struct Filler<'r, 'a> {
    row: &'r mut [Cell<'a>; MAX_COLUMNS],
    len: usize,
}

impl<'a> Filler<'_, 'a> {
    fn push(&mut self, cell: Cell<'a>) {
        self.row[self.len] = cell;
        self.len += 1;
    }

    fn extend(&mut self, cells: impl IntoIterator<Item = Cell<'a>>) {
        cells.into_iter().for_each(|c| self.push(c));
    }
}

/// Where one kind's rows go.
trait RowSink {
    fn row(&mut self, cells: &[Cell<'_>]) -> anyhow::Result<()>;
    /// Finishes the file; its size in bytes.
    fn finish(self: Box<Self>) -> anyhow::Result<u64>;
}

/// A timestamp column's value as RFC 3339 in UTC (the number itself if out of range).
fn rfc3339(out: &mut impl std::io::Write, ty: Ty, v: i64) -> std::io::Result<()> {
    let t = match ty {
        Ty::Nanos => jiff::Timestamp::from_nanosecond(v.into()),
        _ => jiff::Timestamp::from_millisecond(v),
    };
    match t {
        Ok(t) => write!(out, "{t}"),
        Err(_) => write!(out, "{v}"),
    }
}

/// A cell as CSV text, into `out` (emptied first).
fn text(out: &mut Vec<u8>, column: &Column, cell: Cell<'_>) -> std::io::Result<()> {
    out.clear();
    match cell {
        Cell::Null => Ok(()),
        Cell::Text(s) => out.write_all(s.as_bytes()),
        Cell::Int(v) if matches!(column.ty, Ty::Millis | Ty::Nanos) => rfc3339(out, column.ty, v),
        Cell::Int(v) => write!(out, "{v}"),
        Cell::UInt(v) => write!(out, "{v}"),
        Cell::Float(v) => write!(out, "{v}"),
        Cell::Ints(v) => {
            for (i, x) in v.iter().enumerate() {
                write!(out, "{}{x}", if i > 0 { ";" } else { "" })?;
            }
            Ok(())
        }
        Cell::Frame(t) => write!(out, "{t}"),
    }
}

struct CsvSink {
    columns: &'static [Column],
    out: csv::Writer<BufWriter<File>>,
    path: PathBuf,
    field: Vec<u8>,
}

impl RowSink for CsvSink {
    fn row(&mut self, cells: &[Cell<'_>]) -> anyhow::Result<()> {
        for (column, &cell) in self.columns.iter().zip(cells) {
            text(&mut self.field, column, cell)?;
            self.out.write_field(&self.field)?;
        }
        Ok(self.out.write_record(None::<&[u8]>)?)
    }

    fn finish(self: Box<Self>) -> anyhow::Result<u64> {
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(std::fs::metadata(&self.path)?.len())
    }
}

struct JsonlSink {
    columns: &'static [Column],
    out: BufWriter<File>,
    path: PathBuf,
}

impl RowSink for JsonlSink {
    /// An object with the columns in their order (a map would sort them).
    fn row(&mut self, cells: &[Cell<'_>]) -> anyhow::Result<()> {
        let out = &mut self.out;
        out.write_all(b"{")?;
        for (i, (column, &cell)) in self.columns.iter().zip(cells).enumerate() {
            if i > 0 {
                out.write_all(b",")?;
            }
            write!(out, "\"{}\":", column.name)?;
            match cell {
                Cell::Null => out.write_all(b"null")?,
                Cell::Int(v) if matches!(column.ty, Ty::Millis | Ty::Nanos) => {
                    // RFC 3339 needs no escaping in a JSON string.
                    out.write_all(b"\"")?;
                    rfc3339(out, column.ty, v)?;
                    out.write_all(b"\"")?
                }
                Cell::Text(s) => serde_json::to_writer(&mut *out, s)?,
                Cell::Int(v) => write!(out, "{v}")?,
                Cell::UInt(v) => write!(out, "{v}")?,
                Cell::Float(v) => serde_json::to_writer(&mut *out, &v)?,
                Cell::Ints(v) => serde_json::to_writer(&mut *out, v)?,
                Cell::Frame(t) => write!(out, "\"{t}\"")?,
            }
        }
        Ok(out.write_all(b"}\n")?)
    }

    fn finish(self: Box<Self>) -> anyhow::Result<u64> {
        self.out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(std::fs::metadata(&self.path)?.len())
    }
}

/// Rows per Parquet row group: the rows buffered at a time (about 100 bytes each).
const ROW_GROUP: usize = 128 * 1024;

/// One column's buffered values and levels.
enum Values {
    Int64(Vec<i64>),
    Int32(Vec<i32>),
    Double(Vec<f64>),
    Bytes(Vec<ByteArray>),
}

struct Buffer {
    values: Values,
    def: Vec<i16>,
    rep: Vec<i16>,
}

struct ParquetSink {
    columns: &'static [Column],
    writer: SerializedFileWriter<File>,
    buffers: Vec<Buffer>,
    rows: usize,
    path: PathBuf,
}

fn parquet_schema(kind: EventKind) -> anyhow::Result<Type> {
    let fields: Vec<String> = columns(kind)
        .iter()
        .map(|c| {
            let repetition = if c.optional { "optional" } else { "required" };
            let name = c.name;
            match c.ty {
                Ty::Text => format!("{repetition} binary {name} (STRING);"),
                Ty::Int64 => format!("{repetition} int64 {name};"),
                Ty::UInt64 => format!("{repetition} int64 {name} (INTEGER(64,false));"),
                Ty::Int32 => format!("{repetition} int32 {name};"),
                Ty::Float64 => format!("{repetition} double {name};"),
                Ty::Millis => format!("{repetition} int64 {name} (TIMESTAMP(MILLIS,true));"),
                Ty::Nanos => format!("{repetition} int64 {name} (TIMESTAMP(NANOS,true));"),
                Ty::Ints => {
                    format!("{repetition} group {name} (LIST) {{ repeated group list {{ required int32 element; }} }}")
                }
            }
        })
        .collect();
    let text = format!("message {} {{ {} }}", kind.name(), fields.join(" "));
    Ok(parquet::schema::parser::parse_message_type(&text)?)
}

impl ParquetSink {
    fn create(kind: EventKind, path: &Path) -> anyhow::Result<ParquetSink> {
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_created_by(format!("tickvault {}", env!("CARGO_PKG_VERSION")))
            .build();
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let writer = SerializedFileWriter::new(file, Arc::new(parquet_schema(kind)?), Arc::new(props))?;
        let buffers = columns(kind)
            .iter()
            .map(|c| Buffer {
                values: match c.ty {
                    Ty::Text => Values::Bytes(Vec::new()),
                    Ty::Int32 | Ty::Ints => Values::Int32(Vec::new()),
                    Ty::Float64 => Values::Double(Vec::new()),
                    Ty::Int64 | Ty::UInt64 | Ty::Millis | Ty::Nanos => Values::Int64(Vec::new()),
                },
                def: Vec::new(),
                rep: Vec::new(),
            })
            .collect();
        Ok(ParquetSink {
            columns: columns(kind),
            writer,
            buffers,
            rows: 0,
            path: path.to_owned(),
        })
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if self.rows == 0 {
            return Ok(());
        }
        let mut group = self.writer.next_row_group()?;
        for (column, buffer) in self.columns.iter().zip(&mut self.buffers) {
            let mut writer = group.next_column()?.context("a column for each buffer")?;
            let def = (column.optional || column.ty == Ty::Ints).then_some(&buffer.def[..]);
            let rep = (column.ty == Ty::Ints).then_some(&buffer.rep[..]);
            match &mut buffer.values {
                Values::Int64(v) => {
                    writer.typed::<Int64Type>().write_batch(v, def, rep)?;
                    v.clear();
                }
                Values::Int32(v) => {
                    writer.typed::<Int32Type>().write_batch(v, def, rep)?;
                    v.clear();
                }
                Values::Double(v) => {
                    writer.typed::<DoubleType>().write_batch(v, def, rep)?;
                    v.clear();
                }
                Values::Bytes(v) => {
                    writer.typed::<ByteArrayType>().write_batch(v, def, rep)?;
                    v.clear();
                }
            }
            buffer.def.clear();
            buffer.rep.clear();
            writer.close()?;
        }
        group.close()?;
        self.rows = 0;
        Ok(())
    }
}

impl RowSink for ParquetSink {
    fn row(&mut self, cells: &[Cell<'_>]) -> anyhow::Result<()> {
        for ((column, buffer), &cell) in self.columns.iter().zip(&mut self.buffers).zip(cells) {
            match (cell, &mut buffer.values) {
                (Cell::Null, _) => buffer.def.push(0),
                (Cell::Ints(list), Values::Int32(v)) => {
                    // A required LIST: definition level 1 for each element, 0 for an empty
                    // list; repetition level 0 for a row's first entry, 1 after.
                    if list.is_empty() {
                        buffer.def.push(0);
                        buffer.rep.push(0);
                    }
                    for (i, &x) in list.iter().enumerate() {
                        v.push(x);
                        buffer.def.push(1);
                        buffer.rep.push(i16::from(i > 0));
                    }
                    continue;
                }
                (Cell::Text(s), Values::Bytes(v)) => v.push(ByteArray::from(s)),
                (Cell::Frame(t), Values::Bytes(v)) => v.push(ByteArray::from(t.to_string().as_str())),
                (Cell::Int(x), Values::Int64(v)) => v.push(x),
                (Cell::Int(x), Values::Int32(v)) => v.push(i32::try_from(x)?),
                (Cell::UInt(x), Values::Int64(v)) => v.push(x as i64), // UINT_64: the same bits
                (Cell::Float(x), Values::Double(v)) => v.push(x),
                (cell, _) => anyhow::bail!("column {}: {cell:?} does not fit {:?}", column.name, column.ty),
            }
            if column.optional && !matches!(cell, Cell::Null) {
                buffer.def.push(1);
            }
        }
        self.rows += 1;
        if self.rows >= ROW_GROUP {
            self.flush()?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> anyhow::Result<u64> {
        self.flush()?;
        let file = self.writer.into_inner()?;
        file.sync_all()?;
        Ok(std::fs::metadata(&self.path)?.len())
    }
}

fn open_sink(format: Format, kind: EventKind, path: &Path) -> anyhow::Result<Box<dyn RowSink>> {
    let columns = columns(kind);
    let create = || File::create(path).with_context(|| format!("creating {}", path.display()));
    Ok(match format {
        Format::Parquet => Box::new(ParquetSink::create(kind, path)?),
        Format::Csv => {
            let mut out = csv::Writer::from_writer(BufWriter::with_capacity(1 << 20, create()?));
            out.write_record(columns.iter().map(|c| c.name))?;
            Box::new(CsvSink {
                columns,
                out,
                path: path.to_owned(),
                field: Vec::new(),
            })
        }
        Format::Jsonl => Box::new(JsonlSink {
            columns,
            out: BufWriter::with_capacity(1 << 20, create()?),
            path: path.to_owned(),
        }),
    })
}

/// A file being written: its sink and its figures.
struct Output {
    kind: EventKind,
    path: PathBuf,
    partial: PathBuf,
    sink: Box<dyn RowSink>,
    rows: u64,
}

pub fn run(spec: &ExportSpec) -> anyhow::Result<ExitCode> {
    let symbol = match &spec.symbol {
        None => None,
        Some(s) => Some(super::backfill::parse_symbol(s).ok_or_else(|| {
            super::BadInput(format!(
                "--symbol {s:?}: not a symbol (EUR/USD, C:EURUSD, BTC-USD, AAPL)"
            ))
        })?),
    };
    let kind = spec.kind.as_deref().map(|k| match k {
        "quote" => EventKind::Quote,
        "trade" => EventKind::Trade,
        _ => EventKind::Bar,
    });
    let (from, to) = (spec.from.unwrap_or(i64::MIN), spec.to.unwrap_or(i64::MAX));
    let reader = Wal::open_read_only(&spec.data_dir)?;
    let lanes: Vec<Lane> = spec.lane.map_or_else(|| Lane::ALL.to_vec(), |l| vec![l]);
    let total: u64 = lanes
        .iter()
        .map(|&lane| -> anyhow::Result<u64> {
            Ok(match (reader.first_seq(lane)?, reader.last_seq(lane)?) {
                (Some(first), Some(last)) => last - first + 1,
                _ => 0,
            })
        })
        .sum::<anyhow::Result<u64>>()?;
    std::fs::create_dir_all(&spec.out).with_context(|| format!("making {}", spec.out.display()))?;

    let bar = records_bar("export", total);

    // Written under a temporary name and renamed when complete: a file of the final name
    // is never a cut-short export.
    let mut outputs: Vec<Option<Output>> = (0..EventKind::ALL.len()).map(|_| None).collect();
    let open_output = |kind: EventKind| -> anyhow::Result<Output> {
        let path = spec.out.join(format!("{}.{}", kind.name(), spec.format.extension()));
        let partial = spec
            .out
            .join(format!(".{}.{}.partial", kind.name(), spec.format.extension()));
        Ok(Output {
            kind,
            sink: open_sink(spec.format, kind, &partial)?,
            path,
            partial,
            rows: 0,
        })
    };
    if let Some(kind) = kind {
        outputs[kind.index()] = Some(open_output(kind)?);
    }

    let started = Instant::now();
    let (mut seen, mut not_events, mut corrupt, mut undecodable) = (0u64, 0u64, 0u64, 0u64);
    let mut failed: Option<anyhow::Error> = None;
    for &lane in &lanes {
        reader.scan(lane, 0, u64::MAX, |seq, decoded| {
            seen += 1;
            if seen % 65_536 == 0 {
                bar.set_position(seen);
            }
            let record = match decoded {
                Ok(record) if record.kind == EVENT_KIND => record,
                Ok(_) => {
                    not_events += 1;
                    return true;
                }
                Err(_) => {
                    corrupt += 1;
                    return true;
                }
            };
            let Ok(event) = Event::from_payload(record.payload) else {
                undecodable += 1;
                return true;
            };
            if kind.is_some_and(|k| k != event.kind())
                || !(from..to).contains(&event.ts_ms())
                || symbol
                    .as_ref()
                    .is_some_and(|(feed, s)| *feed != event.capture.feed || s != event.symbol())
            {
                return true;
            }
            let slot = &mut outputs[event.kind().index()];
            if slot.is_none() {
                match open_output(event.kind()) {
                    Ok(output) => *slot = Some(output),
                    Err(e) => {
                        failed = Some(e);
                        return false;
                    }
                }
            }
            let output = slot.as_mut().expect("opened above");
            let mut row = [Cell::Null; MAX_COLUMNS];
            let n = cells(lane, seq, &event, &mut row);
            if let Err(e) = output.sink.row(&row[..n]) {
                failed = Some(e);
                return false;
            }
            output.rows += 1;
            true
        })?;
        if let Some(e) = failed.take() {
            bar.abandon();
            return Err(e);
        }
    }
    bar.finish_and_clear();

    let elapsed = started.elapsed().as_secs_f64();
    let mut out = std::io::stdout().lock();
    let mut rows = 0;
    for output in outputs.into_iter().flatten() {
        let bytes = output.sink.finish()?;
        std::fs::rename(&output.partial, &output.path)
            .with_context(|| format!("renaming to {}", output.path.display()))?;
        writeln!(
            out,
            "{:<6} {:>12} rows  {:>10}  {}",
            output.kind.name(),
            output.rows,
            super::wal::human_bytes(bytes),
            output.path.display()
        )?;
        rows += output.rows;
    }
    writeln!(
        out,
        "exported {rows} events of {seen} records read in {elapsed:.1} s ({:.0} rows/s)",
        rows as f64 / elapsed.max(1e-9)
    )?;
    if not_events > 0 {
        writeln!(
            out,
            "skipped {not_events} records that are not market events (drill records)"
        )?;
    }
    if corrupt + undecodable > 0 {
        writeln!(
            out,
            "skipped {} corrupt records ({corrupt} failed their CRC, {undecodable} did not decode): `tickvault wal check` lists them",
            corrupt + undecodable
        )?;
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
