//! `reflex import`: loads historical events from a file into the configured store
//! through the engine's normal ingest ([`Engine::ingest`], in batches), so validation,
//! dedupe, the bot filter's rules, profiles and the event log behave exactly as for live
//! traffic.
//!
//! Formats (plain or gzip, told by the first two bytes; `--format` or detected from the
//! header line):
//!
//! - `inter`: RecBole/MovieLens `.inter`, tab-separated, header naming its columns
//!   `user_id:token item_id:token rating:float timestamp:float` (any order; `rating` is
//!   optional and ignored). Timestamps in seconds.
//! - `tsv`: `user item rating timestamp(seconds)`, tab-separated, by position, after a
//!   header line (MovieLens 1M's `ratings_numeric.tsv.gz`).
//! - `csv`: the generic event format, comma- (or tab-) separated with a header naming the
//!   columns `user_id,item_id,kind,timestamp` plus optional `event_id` and `weight`, in
//!   any order. `kind` is `view`, `click`, `add_to_cart`, `remove_from_cart`, `purchase`
//!   or `custom:NAME`; `timestamp` is Unix seconds (a number below 10¹¹, fractions
//!   allowed), Unix milliseconds (10¹¹ and above) or RFC 3339 (`2026-11-28T10:00:00Z`,
//!   `…+02:00`, fractional seconds allowed); `weight` is the weight of a custom kind.
//!   Fields may be double-quoted (`""` inside quotes is a quote).
//!
//! Ratings (`inter`, `tsv`) become events of one kind, `--kind` (`view` by default):
//! every rating is a positive interaction, as in the offline evaluation.
//!
//! Event ids: a row without an `event_id` gets one derived from its user, item, kind and
//! timestamp (`imp-` and 32 hex digits of a hash), so importing the same file again
//! within the dedupe window (`store.*.dedupe_window_ms`, 7 days by default) answers
//! every row `DUPLICATE`; identical rows in one file count once.
//!
//! Time: every event keeps its own timestamp (event time: sessions, the recent list and
//! popularity use it) while its ingest time is the wall clock, as for live traffic, so
//! profile TTLs (`profiles.ttl_ms`, 30 days, counted from the wall-clock time of the last
//! change) start at the import and old data such as MovieLens (2000–2003) is not expired
//! at once. Validation refuses only timestamps at or before 1970 and more than
//! `engine.max_future_ms` ahead of the clock; there is no lower limit on age. The per-user
//! rate limit of the bot filter counts wall-clock time, so a replay far faster than life
//! would be filtered: the import turns it off (`--keep-rate-limit` keeps it); the
//! flag and user-agent rules stay on.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use reflex_core::engine::EventOutcome;
use reflex_core::hash;
use reflex_core::{EventKind, RawEvent, RawKind};
use serde::Serialize;

use crate::config::{Config, FlagOverrides};
use crate::metrics::Metrics;

/// A file format `reflex import` and `reflex train --data` read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// RecBole/MovieLens `.inter`: tab-separated, columns named in the header.
    Inter,
    /// `user item rating timestamp(seconds)`, tab-separated, by position.
    Tsv,
    /// Generic events: `user_id,item_id,kind,timestamp[,event_id][,weight]`.
    Csv,
}

/// Flags of `reflex import`.
#[derive(Clone, Debug, clap::Args)]
pub struct ImportArgs {
    /// File of events or ratings, plain or gzip (see `--format`).
    #[arg(long)]
    pub data: PathBuf,
    /// File format; detected from the header line when not given: `csv` when a column is
    /// named `kind`, `inter` when columns are typed (`user_id:token`), else `tsv`.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Event kind of every rating of an `inter` or `tsv` file: view, click,
    /// add_to_cart, remove_from_cart, purchase or custom:NAME.
    #[arg(long, default_value = "view")]
    pub kind: String,
    /// Events per ingest batch: 1 to `engine.max_batch`, which is the default.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Keep the bot filter's per-user rate limit (off by default: a replay is faster than
    /// life).
    #[arg(long)]
    pub keep_rate_limit: bool,
    /// Do not snapshot the model at the end (embedded store: the snapshot saves the next
    /// start replaying the imported events into the model).
    #[arg(long)]
    pub no_snapshot: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A row that could not become an event: its line number and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rejection {
    /// 1-based line number in the file (the header is line 1).
    pub line: u64,
    /// Why.
    pub reason: String,
}

/// Rejections kept for the summary.
const KEEP_REJECTIONS: usize = 5;

/// What an import did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImportSummary {
    /// The file.
    pub data: PathBuf,
    /// Its format.
    pub format: Option<Format>,
    /// Data rows read (not counting the header and blank lines).
    pub rows: u64,
    /// Events accepted.
    pub accepted: u64,
    /// Events already in the store (within the dedupe window).
    pub duplicate: u64,
    /// Rows that did not parse or that validation rejected.
    pub rejected: u64,
    /// Events logged as bot or noise traffic.
    pub filtered: u64,
    /// The first few rejections.
    pub first_rejections: Vec<Rejection>,
    /// Wall time, seconds.
    pub elapsed_secs: f64,
    /// Rows per second.
    pub rows_per_sec: f64,
    /// The model version saved at the end, if any.
    pub snapshot_version: Option<u64>,
}

impl ImportSummary {
    fn reject(&mut self, line: u64, reason: String) {
        self.rejected += 1;
        if self.first_rejections.len() < KEEP_REJECTIONS {
            self.first_rejections.push(Rejection { line, reason });
        }
    }
}

impl std::fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "imported {} ({}): {} rows in {:.2} s, {:.0} rows/s",
            self.data.display(),
            self.format.map_or("?", |f| match f {
                Format::Inter => "inter",
                Format::Tsv => "tsv",
                Format::Csv => "csv",
            }),
            self.rows,
            self.elapsed_secs,
            self.rows_per_sec
        )?;
        writeln!(
            f,
            "accepted {}, duplicate {}, rejected {}, filtered {}",
            self.accepted, self.duplicate, self.rejected, self.filtered
        )?;
        for r in &self.first_rejections {
            writeln!(f, "  line {}: {}", r.line, r.reason)?;
        }
        if self.rejected > self.first_rejections.len() as u64 {
            writeln!(
                f,
                "  … and {} more",
                self.rejected - self.first_rejections.len() as u64
            )?;
        }
        if let Some(v) = self.snapshot_version {
            writeln!(f, "model snapshot saved as version {v}")?;
        }
        Ok(())
    }
}

/// Splits one line at `delim`, honouring double quotes (`""` inside quotes is a quote).
fn split_fields(line: &str, delim: char) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    field.push('"');
                } else {
                    quoted = false;
                }
            } else {
                field.push(c);
            }
        } else if c == '"' && at_start {
            quoted = true;
            at_start = false;
        } else if c == delim {
            out.push(std::mem::take(&mut field));
            at_start = true;
        } else {
            field.push(c);
            at_start = false;
        }
    }
    if quoted {
        return Err("unterminated quoted field".into());
    }
    out.push(field);
    Ok(out)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses an RFC 3339 date-time (`YYYY-MM-DDTHH:MM:SS[.fff](Z|±HH:MM)`, `T` or a
/// space between date and time) into ms since the epoch.
pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    let bad = || format!("timestamp {s:?} is not a number or an RFC 3339 date-time");
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let t = s.get(r).ok_or_else(bad)?;
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    if b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return Err(bad());
    }
    let mut rest = &s[19..];
    let mut frac_ms = 0i64;
    if let Some(r) = rest.strip_prefix('.') {
        let digits = r.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let mut ms = 0i64;
        for (n, c) in r[..digits].bytes().take(3).enumerate() {
            ms += i64::from(c - b'0') * [100, 10, 1][n];
        }
        frac_ms = ms;
        rest = &r[digits..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let (oh, om) = (
                o[1..3].parse::<i64>().map_err(|_| bad())?,
                o[4..6].parse::<i64>().map_err(|_| bad())?,
            );
            let m = oh * 60 + om;
            if o.starts_with('-') { -m } else { m }
        }
        _ => return Err(bad()),
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    Ok(secs * 1000 + frac_ms)
}

/// Numbers below this are Unix seconds, at or above it Unix milliseconds (10¹¹ s is
/// the year 5138; 10¹¹ ms is March 1973).
pub const SECONDS_BELOW: f64 = 1e11;

/// Parses a timestamp of the generic format into ms since the epoch: seconds, ms (see
/// [`SECONDS_BELOW`]) or RFC 3339.
pub fn parse_timestamp(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("timestamp is empty".into());
    }
    if let Ok(n) = s.parse::<f64>() {
        if !n.is_finite() {
            return Err(format!("timestamp {s:?} is not finite"));
        }
        return Ok(if n.abs() < SECONDS_BELOW {
            (n * 1000.0).round() as i64
        } else {
            n.round() as i64
        });
    }
    parse_rfc3339(s)
}

/// Parses seconds (a number, fractions allowed) into ms.
fn parse_seconds(s: &str) -> Result<i64, String> {
    match s.trim().parse::<f64>() {
        Ok(n) if n.is_finite() => Ok((n * 1000.0).round() as i64),
        _ => Err(format!(
            "timestamp {:?} is not a number of seconds",
            s.trim()
        )),
    }
}

/// The kind named `label` (`view`, …, `custom:NAME`) as ingest takes it.
pub fn parse_kind(label: &str) -> Result<(RawKind, String), String> {
    let kind = match EventKind::from_label(label.trim()) {
        Some(EventKind::View) => RawKind::View,
        Some(EventKind::Click) => RawKind::Click,
        Some(EventKind::AddToCart) => RawKind::AddToCart,
        Some(EventKind::RemoveFromCart) => RawKind::RemoveFromCart,
        Some(EventKind::Purchase) => RawKind::Purchase,
        Some(EventKind::Custom(name)) => return Ok((RawKind::Custom, name.to_string())),
        None => {
            return Err(format!(
                "kind {:?} is not view, click, add_to_cart, remove_from_cart, purchase or \
                 custom:NAME",
                label.trim()
            ));
        }
    };
    Ok((kind, String::new()))
}

/// The event id of a row without one: `imp-` and a 128-bit hash of user, item, kind
/// label and timestamp (ms), so the same row always gets the same id.
pub fn derived_event_id(user: &str, item: &str, kind: &str, timestamp_ms: i64) -> String {
    let key = format!("{user}\u{1f}{item}\u{1f}{kind}\u{1f}{timestamp_ms}");
    format!(
        "imp-{:016x}{:016x}",
        hash::hash_from(hash::FNV_OFFSET, key.as_bytes()),
        hash::hash_from(0x6c62_272e_07bb_0142, key.as_bytes())
    )
}

/// Column positions of the generic format.
#[derive(Clone, Debug)]
struct CsvColumns {
    user: usize,
    item: usize,
    kind: usize,
    timestamp: usize,
    event_id: Option<usize>,
    weight: Option<usize>,
    count: usize,
}

/// Column positions of a ratings file.
#[derive(Clone, Debug)]
struct RatingColumns {
    user: usize,
    item: usize,
    timestamp: usize,
    count: usize,
}

#[derive(Clone, Debug)]
enum Layout {
    Ratings(RatingColumns),
    Events(CsvColumns, char),
}

/// Turns the lines of one file into events: built from the header line, then one
/// [`RowParser::parse`] per data line.
#[derive(Clone, Debug)]
pub struct RowParser {
    format: Format,
    layout: Layout,
    /// Kind of every rating (ratings formats).
    kind: (RawKind, String),
    kind_label: String,
}

impl RowParser {
    /// A parser for the file whose first line is `header`, in `format` or the format the
    /// header shows; ratings become events of kind `kind` (a label, see [`parse_kind`]).
    pub fn new(header: &str, format: Option<Format>, kind: &str) -> Result<Self, String> {
        let header = header
            .trim_end_matches(['\r', '\n'])
            .trim_start_matches('\u{feff}');
        let delim = if header.contains('\t') { '\t' } else { ',' };
        let names: Vec<String> = split_fields(header, delim)?
            .into_iter()
            .map(|n| n.trim().to_ascii_lowercase())
            .collect();
        let format = match format {
            Some(f) => f,
            None if names.iter().any(|n| n == "kind") => Format::Csv,
            None if names.iter().any(|n| n.contains(':')) => Format::Inter,
            None if delim == '\t' && names.len() >= 4 => Format::Tsv,
            None => {
                return Err(format!(
                    "cannot tell the format from the header {header:?}; pass --format"
                ));
            }
        };
        let parsed_kind = parse_kind(kind)?;
        let kind_label = kind.trim().to_owned();
        let find = |want: &str| {
            names
                .iter()
                .position(|n| n.split(':').next().is_some_and(|base| base == want))
        };
        let layout = match format {
            Format::Tsv => {
                if names.len() < 4 {
                    return Err(format!(
                        "a tsv file has 4 tab-separated columns (user item rating timestamp), \
                         the header has {}",
                        names.len()
                    ));
                }
                Layout::Ratings(RatingColumns {
                    user: 0,
                    item: 1,
                    timestamp: 3,
                    count: 4,
                })
            }
            Format::Inter => {
                let need =
                    |n: &str| find(n).ok_or_else(|| format!("the .inter header has no {n} column"));
                let (user, item, timestamp) =
                    (need("user_id")?, need("item_id")?, need("timestamp")?);
                Layout::Ratings(RatingColumns {
                    user,
                    item,
                    timestamp,
                    count: user.max(item).max(timestamp) + 1,
                })
            }
            Format::Csv => {
                for n in &names {
                    if !matches!(
                        n.as_str(),
                        "user_id" | "item_id" | "kind" | "timestamp" | "event_id" | "weight"
                    ) {
                        return Err(format!(
                            "unknown column {n:?}: the csv header names user_id, item_id, \
                             kind, timestamp and optionally event_id, weight"
                        ));
                    }
                }
                let need =
                    |n: &str| find(n).ok_or_else(|| format!("the csv header has no {n} column"));
                let cols = CsvColumns {
                    user: need("user_id")?,
                    item: need("item_id")?,
                    kind: need("kind")?,
                    timestamp: need("timestamp")?,
                    event_id: find("event_id"),
                    weight: find("weight"),
                    count: names.len(),
                };
                Layout::Events(cols, delim)
            }
        };
        Ok(Self {
            format,
            layout,
            kind: parsed_kind,
            kind_label,
        })
    }

    /// The format in force.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Parses one data line into an event (ids are checked by ingest's validation, not
    /// here); the error says what is wrong with the row.
    pub fn parse(&self, line: &str) -> Result<RawEvent, String> {
        let line = line.trim_end_matches(['\r', '\n']);
        match &self.layout {
            Layout::Ratings(c) => {
                let cols: Vec<&str> = line.split('\t').collect();
                if cols.len() < c.count {
                    return Err(format!(
                        "expected {} tab-separated columns, found {}",
                        c.count,
                        cols.len()
                    ));
                }
                let (user, item) = (cols[c.user].trim(), cols[c.item].trim());
                let ts = parse_seconds(cols[c.timestamp])?;
                Ok(RawEvent {
                    event_id: derived_event_id(user, item, &self.kind_label, ts),
                    user_id: user.to_owned(),
                    item_id: item.to_owned(),
                    kind: Some(self.kind.0),
                    custom_kind: self.kind.1.clone(),
                    timestamp_ms: Some(ts),
                    ..RawEvent::default()
                })
            }
            Layout::Events(c, delim) => {
                let cols = split_fields(line, *delim)?;
                if cols.len() != c.count {
                    return Err(format!(
                        "expected {} fields as in the header, found {}",
                        c.count,
                        cols.len()
                    ));
                }
                let (user, item) = (cols[c.user].trim(), cols[c.item].trim());
                let kind_label = cols[c.kind].trim();
                let (kind, custom_kind) = parse_kind(kind_label)?;
                let ts = parse_timestamp(&cols[c.timestamp])?;
                let weight = match c.weight.map(|i| cols[i].trim()) {
                    None | Some("") => None,
                    Some(w) => Some(
                        w.parse::<f64>()
                            .map_err(|_| format!("weight {w:?} is not a number"))?,
                    ),
                };
                let event_id = match c.event_id.map(|i| cols[i].trim()) {
                    Some(id) if !id.is_empty() => id.to_owned(),
                    _ => derived_event_id(user, item, kind_label, ts),
                };
                Ok(RawEvent {
                    event_id,
                    user_id: user.to_owned(),
                    item_id: item.to_owned(),
                    kind: Some(kind),
                    custom_kind,
                    weight,
                    timestamp_ms: Some(ts),
                    ..RawEvent::default()
                })
            }
        }
    }
}

/// One batch of parsed rows with the parse failures among them.
pub struct Chunk {
    /// Parsed rows with their line numbers.
    pub rows: Vec<(u64, RawEvent)>,
    /// Rows that did not parse.
    pub bad: Vec<Rejection>,
    /// Data rows this chunk covers (parsed or not).
    pub lines: u64,
}

/// Reads `reader` (whose first line is the header) on a thread, sending chunks of up to
/// `batch` parsed rows. Returns the parser's format, the receiver and the thread.
pub fn read_chunks(
    mut reader: Box<dyn BufRead + Send>,
    format: Option<Format>,
    kind: &str,
    batch: usize,
) -> anyhow::Result<(
    Format,
    tokio::sync::mpsc::Receiver<Chunk>,
    std::thread::JoinHandle<anyhow::Result<()>>,
)> {
    let mut header = String::new();
    reader
        .read_line(&mut header)
        .context("reading the header line")?;
    anyhow::ensure!(
        !header.trim().is_empty(),
        "the file is empty (no header line)"
    );
    let parser = RowParser::new(&header, format, kind).map_err(|e| anyhow::anyhow!("{e}"))?;
    let format = parser.format();
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(4);
    let batch = batch.max(1);
    let thread = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut line_no = 1u64;
        let mut buf = String::new();
        let mut chunk = Chunk {
            rows: Vec::with_capacity(batch),
            bad: Vec::new(),
            lines: 0,
        };
        loop {
            buf.clear();
            let n = reader
                .read_line(&mut buf)
                .with_context(|| format!("reading line {}", line_no + 1))?;
            if n == 0 {
                break;
            }
            line_no += 1;
            if buf.trim().is_empty() {
                continue;
            }
            chunk.lines += 1;
            match parser.parse(&buf) {
                Ok(ev) => chunk.rows.push((line_no, ev)),
                Err(reason) => chunk.bad.push(Rejection {
                    line: line_no,
                    reason,
                }),
            }
            if chunk.rows.len() >= batch {
                let full = std::mem::replace(
                    &mut chunk,
                    Chunk {
                        rows: Vec::with_capacity(batch),
                        bad: Vec::new(),
                        lines: 0,
                    },
                );
                if tx.blocking_send(full).is_err() {
                    return Ok(());
                }
            }
        }
        if chunk.lines > 0 {
            let _ = tx.blocking_send(chunk);
        }
        Ok(())
    });
    Ok((format, rx, thread))
}

fn progress_bar(size: u64) -> ProgressBar {
    let bar = ProgressBar::new(size.max(1));
    if let Ok(style) =
        ProgressStyle::with_template("{bar:30} {percent:>3}% {msg} [{elapsed_precise}, eta {eta}]")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Runs `reflex import`.
pub async fn run(
    args: ImportArgs,
    config: Option<&Path>,
    flags: FlagOverrides,
) -> anyhow::Result<()> {
    let summary = import(&args, config, &flags).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).context("printing the summary")?
        );
    } else {
        print!("{summary}");
    }
    Ok(())
}

/// Imports `args.data` into the store `config` names and returns the summary.
pub async fn import(
    args: &ImportArgs,
    config_file: Option<&Path>,
    flags: &FlagOverrides,
) -> anyhow::Result<ImportSummary> {
    let mut config = Config::load(config_file, flags)?;
    if !args.keep_rate_limit {
        config.engine.bot_filter.max_events_per_user_per_sec = 0;
    }
    let max_batch = config.engine.max_batch;
    let batch = args.batch.unwrap_or(max_batch);
    anyhow::ensure!(
        (1..=max_batch).contains(&batch),
        "--batch must be 1 to engine.max_batch = {max_batch}, got {batch}"
    );
    let reflex_models::batch::LinesFile {
        reader,
        size,
        consumed,
    } = reflex_models::batch::open_lines(&args.data).context("opening the data file")?;
    let (format, mut chunks, reader_thread) =
        read_chunks(reader, args.format, &args.kind, batch)
            .with_context(|| format!("reading {}", args.data.display()))?;
    let metrics = Metrics::new().context("registering metrics")?;
    let engine = crate::app::build_engine(&config, &metrics).await?;

    let start = Instant::now();
    let mut summary = ImportSummary {
        data: args.data.clone(),
        format: Some(format),
        ..ImportSummary::default()
    };
    let bar = progress_bar(size);
    while let Some(chunk) = chunks.recv().await {
        summary.rows += chunk.lines;
        for r in chunk.bad {
            summary.reject(r.line, r.reason);
        }
        if !chunk.rows.is_empty() {
            let (lines, events): (Vec<u64>, Vec<RawEvent>) = chunk.rows.into_iter().unzip();
            let outcomes = engine.ingest(events).await.with_context(|| {
                format!(
                    "ingesting lines {}–{} (the rows before were imported; importing again \
                     is idempotent)",
                    lines.first().copied().unwrap_or(0),
                    lines.last().copied().unwrap_or(0)
                )
            })?;
            for (line, outcome) in lines.into_iter().zip(outcomes) {
                match outcome {
                    EventOutcome::Accepted => summary.accepted += 1,
                    EventOutcome::Duplicate => summary.duplicate += 1,
                    EventOutcome::Filtered(_) => summary.filtered += 1,
                    EventOutcome::Rejected(reason) => summary.reject(line, reason),
                }
            }
        }
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        bar.set_position(consumed.load(Ordering::Relaxed));
        bar.set_message(format!(
            "{} rows, {:.0} rows/s",
            summary.rows,
            summary.rows as f64 / secs
        ));
    }
    match reader_thread.join() {
        Ok(result) => result.with_context(|| format!("reading {}", args.data.display()))?,
        Err(_) => anyhow::bail!("the reader thread of {} panicked", args.data.display()),
    }
    bar.finish_and_clear();
    // Profiles durable now, so the next start does not replay the import into them; the
    // model snapshotted, so it does not relearn it (a shared store's replicas learn from
    // the log and snapshot themselves).
    engine
        .checkpoint()
        .await
        .context("writing the profile checkpoint")?;
    if !args.no_snapshot && !config.store.backend.is_shared() && summary.accepted > 0 {
        let reason = format!("import: {}", args.data.display());
        let version = engine
            .snapshot(&reason, &config.versions.replica())
            .await
            .context("saving the model snapshot")?;
        summary.snapshot_version = Some(version.id);
    }
    summary.elapsed_secs = start.elapsed().as_secs_f64();
    summary.rows_per_sec = summary.rows as f64 / summary.elapsed_secs.max(1e-9);
    // Let the index's background thread and the store settle before the process exits.
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn inter_rows_by_header_names() {
        let p = RowParser::new(
            "item_id:token\tuser_id:token\trating:float\ttimestamp:float\n",
            None,
            "view",
        )
        .unwrap();
        assert_eq!(p.format(), Format::Inter);
        let e = p.parse("242\t196\t3\t881250949\n").unwrap();
        assert_eq!((e.user_id.as_str(), e.item_id.as_str()), ("196", "242"));
        assert_eq!(e.kind, Some(RawKind::View));
        assert_eq!(e.timestamp_ms, Some(881_250_949_000));
        assert!(e.event_id.starts_with("imp-") && e.event_id.len() == 36);
        // Deterministic, and different for another row.
        assert_eq!(
            p.parse("242\t196\t3\t881250949").unwrap().event_id,
            e.event_id
        );
        assert_ne!(
            p.parse("242\t196\t3\t881250950").unwrap().event_id,
            e.event_id
        );
        assert!(p.parse("242\t196\t3").unwrap_err().contains("columns"));
        assert!(
            p.parse("242\t196\t3\tyesterday")
                .unwrap_err()
                .contains("timestamp")
        );
        let missing = RowParser::new("user_id:token\trating:float\n", Some(Format::Inter), "view");
        assert!(missing.unwrap_err().contains("item_id"));
    }

    #[test]
    fn tsv_rows_by_position_with_a_chosen_kind() {
        let p = RowParser::new("user_id\titem_idx\trating\ttimestamp", None, "purchase").unwrap();
        assert_eq!(p.format(), Format::Tsv);
        let e = p.parse("1\t1193\t5\t978300760").unwrap();
        assert_eq!((e.user_id.as_str(), e.item_id.as_str()), ("1", "1193"));
        assert_eq!(e.kind, Some(RawKind::Purchase));
        assert_eq!(e.timestamp_ms, Some(978_300_760_000));
        let custom = RowParser::new("u\ti\tr\tt", Some(Format::Tsv), "custom:rated").unwrap();
        let e = custom.parse("1\t2\t3\t4").unwrap();
        assert_eq!(
            (e.kind, e.custom_kind.as_str()),
            (Some(RawKind::Custom), "rated")
        );
        assert!(
            RowParser::new("u\ti\tr\tt", Some(Format::Tsv), "like")
                .unwrap_err()
                .contains("kind")
        );
        assert!(
            RowParser::new("a,b", None, "view")
                .unwrap_err()
                .contains("--format")
        );
    }

    #[test]
    fn csv_rows_with_every_timestamp_form_and_optional_columns() {
        let p = RowParser::new(
            "user_id,item_id,kind,timestamp,event_id,weight",
            None,
            "view",
        )
        .unwrap();
        assert_eq!(p.format(), Format::Csv);
        let e = p.parse("alice,shoe-1,purchase,1700000000,e1,").unwrap();
        assert_eq!(e.event_id, "e1");
        assert_eq!(e.kind, Some(RawKind::Purchase));
        assert_eq!(e.timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(e.weight, None);
        let e = p.parse("alice,shoe-1,click,1700000000123,,").unwrap();
        assert_eq!(e.timestamp_ms, Some(1_700_000_000_123));
        assert!(e.event_id.starts_with("imp-"));
        let e = p.parse("alice,shoe-1,view,1700000000.5,,").unwrap();
        assert_eq!(e.timestamp_ms, Some(1_700_000_000_500));
        let e = p.parse("alice,shoe-1,view,2023-11-14T22:13:20Z,,").unwrap();
        assert_eq!(e.timestamp_ms, Some(1_700_000_000_000));
        let e = p
            .parse("alice,shoe-1,view,2023-11-15T00:13:20.25+02:00,,")
            .unwrap();
        assert_eq!(e.timestamp_ms, Some(1_700_000_000_250));
        let e = p
            .parse("\"bob, jr\",\"the \"\"best\"\" shoe\",custom:wish,1700000000,,2.5")
            .unwrap();
        assert_eq!(
            (e.user_id.as_str(), e.item_id.as_str()),
            ("bob, jr", "the \"best\" shoe")
        );
        assert_eq!((e.custom_kind.as_str(), e.weight), ("wish", Some(2.5)));
        // Bad rows, with reasons.
        assert!(
            p.parse("alice,shoe-1,like,1,,")
                .unwrap_err()
                .contains("kind \"like\"")
        );
        assert!(
            p.parse("alice,shoe-1,view,soon,,")
                .unwrap_err()
                .contains("RFC 3339")
        );
        assert!(
            p.parse("alice,shoe-1,view,1,,heavy")
                .unwrap_err()
                .contains("weight")
        );
        assert!(
            p.parse("alice,shoe-1,view")
                .unwrap_err()
                .contains("expected 6 fields")
        );
        assert!(
            p.parse("\"alice,shoe-1,view,1,,")
                .unwrap_err()
                .contains("quoted")
        );
        // Tab-separated with the columns in another order.
        let t = RowParser::new("timestamp\tkind\titem_id\tuser_id", None, "view").unwrap();
        let e = t.parse("1700000000\tview\tx\tu").unwrap();
        assert_eq!((e.user_id.as_str(), e.item_id.as_str()), ("u", "x"));
        assert!(
            RowParser::new("user_id,item_id,kind,timestamp,price", None, "view")
                .unwrap_err()
                .contains("price")
        );
        assert!(
            RowParser::new("user_id,item_id,kind", Some(Format::Csv), "view")
                .unwrap_err()
                .contains("timestamp")
        );
    }

    #[test]
    fn rfc3339_edges() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339("2000-02-29 12:00:00z"), Ok(951_825_600_000));
        assert_eq!(
            parse_rfc3339("2026-11-28T10:00:00-01:30"),
            Ok(1_795_860_000_000 + 5_400_000)
        );
        assert!(parse_rfc3339("2026-13-28T10:00:00Z").is_err());
        assert!(parse_rfc3339("2026-11-28T10:00:00").is_err());
        assert!(parse_rfc3339("2026-11-28T10:00:00.Z").is_err());
    }
}
