//! The write-ahead log: every message the broker delivers is appended here, as Arrow IPC,
//! before the engine acknowledges it. A message acknowledged is a message on disk; after a
//! crash the engine replays the log from its last checkpoint.
//!
//! Two sides: the ingest log task numbers messages and appends them to [`Pending`] (memory
//! only); the syncer takes them out once per sync, writes them ([`Wal::write`]), forces
//! them to disk ([`Wal::sync`]) and only then acknowledges them.
//!
//! Layout: `<data-dir>/.wal/<first seq, 20 digits>.arrows`, each an Arrow IPC stream of
//! batches `(seq, received_at, topic, payload, pkid)` (pyarrow reads them with
//! `pyarrow.ipc.open_stream`). A segment is never appended to after a restart, so a write
//! torn by a crash can only be the last batch of a segment: reading stops there, and those
//! messages were never acknowledged (the broker sends them again).
//!
//! Segments roll on size and age, and the checkpointer deletes those wholly before a
//! checkpoint's position, keeping one more segment as a margin: its packet ids let the
//! engine recognise a broker's redelivery of a message it already logged (see
//! [`Redeliveries`]).

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{
    ArrayBuilder, ArrayRef, AsArray, BinaryBuilder, Int64Builder, StringBuilder, UInt16Builder,
    UInt64Builder,
};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, UInt16Type};
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::record_batch::RecordBatch;

use crate::decode::Message;

/// When the log is forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// `fsync` each batch before its messages are acknowledged: survives a power cut.
    Always,
    /// Hand each batch to the operating system before acknowledging: survives a crash of
    /// the engine, not of the machine. Faster on slow disks.
    Off,
}

impl std::str::FromStr for Fsync {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(Fsync::Always),
            "off" => Ok(Fsync::Off),
            _ => Err(format!("`{s}`: the fsync policy is `always` or `off`")),
        }
    }
}

/// A segment rolls once it holds this many bytes.
const SEGMENT_BYTES: u64 = 64 << 20;

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("seq", DataType::UInt64, false),
        Field::new("received_at", DataType::Int64, false),
        Field::new("topic", DataType::Utf8, false),
        Field::new("payload", DataType::Binary, false),
        Field::new("pkid", DataType::UInt16, false),
    ]))
}

pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join(".wal")
}

/// A logged message: its place in the log, and the MQTT packet id it came with (0 for
/// QoS 0 and for messages not from a broker).
pub struct Logged {
    pub seq: u64,
    pub msg: Message,
    pub pkid: u16,
}

struct Segment {
    writer: StreamWriter<BufWriter<File>>,
    bytes: u64,
    opened: Instant,
}

/// Messages appended to the log and not yet written to its file.
///
/// The log task appends each batch it takes from the broker here, a copy into Arrow
/// builders and no system call; the syncer takes everything out as one batch when it is
/// due to sync ([`Pending::take`]) and writes it ([`Wal::write`]). Under load the broker
/// delivers bursts of a few messages, and a write (and an IPC message) per burst was a
/// tenth of the engine's CPU in the nightlight benchmark (docs/benchmarks.md); now there
/// is one per sync.
pub struct Pending {
    seq: UInt64Builder,
    received_at: Int64Builder,
    topic: StringBuilder,
    payload: BinaryBuilder,
    pkid: UInt16Builder,
}

impl Default for Pending {
    fn default() -> Self {
        Pending {
            seq: UInt64Builder::new(),
            received_at: Int64Builder::new(),
            topic: StringBuilder::new(),
            payload: BinaryBuilder::new(),
            pkid: UInt16Builder::new(),
        }
    }
}

impl Pending {
    /// Appends messages numbered from `first` on.
    pub fn append(&mut self, first: u64, msgs: &[(Message, u16)]) {
        for (i, (m, pkid)) in msgs.iter().enumerate() {
            self.seq.append_value(first + i as u64);
            self.received_at.append_value(m.received_at);
            self.topic.append_value(&m.topic);
            self.payload.append_value(&m.payload);
            self.pkid.append_value(*pkid);
        }
    }

    /// Everything appended since the last call, as one batch; `None` when nothing was.
    pub fn take(&mut self) -> std::io::Result<Option<RecordBatch>> {
        if self.seq.is_empty() {
            return Ok(None);
        }
        // The next sync's batch is about as large as this one: the builders start at its
        // size instead of growing from empty, a dozen reallocations per column per sync.
        let rows = self.seq.len();
        let next = Pending {
            seq: UInt64Builder::with_capacity(rows),
            received_at: Int64Builder::with_capacity(rows),
            topic: StringBuilder::with_capacity(rows, self.topic.values_slice().len()),
            payload: BinaryBuilder::with_capacity(rows, self.payload.values_slice().len()),
            pkid: UInt16Builder::with_capacity(rows),
        };
        let mut done = std::mem::replace(self, next);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(done.seq.finish()),
            Arc::new(done.received_at.finish()),
            Arc::new(done.topic.finish()),
            Arc::new(done.payload.finish()),
            Arc::new(done.pkid.finish()),
        ];
        RecordBatch::try_new(schema(), columns)
            .map(Some)
            .map_err(io)
    }
}

/// The writing side of the log: owned by the syncer, which writes what the log task
/// appended ([`Pending`]) and forces it to disk.
pub struct Wal {
    dir: PathBuf,
    fsync: Fsync,
    max_age: Duration,
    next_seq: u64,
    segment: Option<Segment>,
}

impl Wal {
    /// Opens the log for appending after `next_seq` (the position after everything the
    /// log already holds); a new segment starts with the first write.
    pub fn new(dir: PathBuf, fsync: Fsync, max_age: Duration, next_seq: u64) -> Wal {
        Wal {
            dir,
            fsync,
            max_age,
            next_seq,
            segment: None,
        }
    }

    /// The position after everything the log held when it was opened: where the log task
    /// numbers on from.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Writes a batch of [`Pending::take`] to the operating system (not forced to disk:
    /// see [`Wal::sync`]), in one write when it fits the buffer. On an error the segment
    /// is abandoned (a later write starts a new one); ingest stops on it anyway.
    pub fn write(&mut self, batch: &RecordBatch) -> std::io::Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let first = batch
            .column(0)
            .as_primitive::<datafusion::arrow::datatypes::UInt64Type>()
            .value(0);
        let result = self.write_at(first, batch);
        if result.is_err() {
            self.segment = None;
        }
        result
    }

    /// Forces what was written to disk (with `--fsync always`; nothing to do with `off`).
    pub fn sync(&mut self) -> std::io::Result<()> {
        let (Some(seg), Fsync::Always) = (self.segment.as_mut(), self.fsync) else {
            return Ok(());
        };
        let result = seg.writer.get_ref().get_ref().sync_data();
        if result.is_err() {
            self.segment = None;
        }
        result
    }

    fn write_at(&mut self, first: u64, batch: &RecordBatch) -> std::io::Result<()> {
        let roll = match &self.segment {
            Some(s) => s.bytes >= SEGMENT_BYTES || s.opened.elapsed() >= self.max_age,
            None => true,
        };
        if roll {
            // The closing segment is complete on disk before a new one starts: `sync`
            // only syncs the open segment.
            self.sync()?;
            self.segment = None;
            std::fs::create_dir_all(&self.dir)?;
            let path = self.dir.join(format!("{first:020}.arrows"));
            let file = File::create(&path)?;
            sync_dir(&self.dir)?;
            let writer =
                StreamWriter::try_new(BufWriter::with_capacity(WRITE_BUFFER, file), &schema())
                    .map_err(io)?;
            self.segment = Some(Segment {
                writer,
                bytes: 0,
                opened: Instant::now(),
            });
        }
        let Some(seg) = self.segment.as_mut() else {
            return Err(std::io::Error::other("no open segment"));
        };
        seg.writer.write(batch).map_err(io)?;
        // Handed to the operating system in one write (the buffer holds a sync's batch).
        seg.writer.flush().map_err(io)?;
        seg.bytes += batch.get_array_memory_size() as u64;
        Ok(())
    }
}

/// The segment writer's buffer: a sync's batch usually fits, so it goes out in one write.
const WRITE_BUFFER: usize = 256 << 10;

fn io(e: datafusion::arrow::error::ArrowError) -> std::io::Error {
    match e {
        datafusion::arrow::error::ArrowError::IoError(_, e) => e,
        e => std::io::Error::other(e),
    }
}

pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Segment files, oldest first, with their first seq.
fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let first = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".arrows"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(first) = first {
            out.push((first, path));
        }
    }
    out.sort();
    Ok(out)
}

/// What a restart finds in the log.
pub struct Recovered {
    /// Messages at or after the checkpoint's position, in order: to be processed again.
    pub replay: Vec<Logged>,
    /// The seq after the last message logged.
    pub next_seq: u64,
    /// Packet ids of every message still in the log.
    pub redeliveries: Redeliveries,
    /// Batches that could not be read: the torn end of a segment a crash interrupted.
    pub torn: usize,
}

/// Reads every segment; keeps the messages from `from` on for replay.
pub fn recover(dir: &Path, from: u64) -> std::io::Result<Recovered> {
    let mut out = Recovered {
        replay: Vec::new(),
        next_seq: from,
        redeliveries: Redeliveries::default(),
        torn: 0,
    };
    for (_, path) in segments(dir)? {
        let file = File::open(&path)?;
        // An empty or torn segment header: the crash came before its first batch.
        let Ok(reader) = StreamReader::try_new(std::io::BufReader::new(file), None) else {
            out.torn += 1;
            continue;
        };
        for batch in reader {
            let Ok(b) = batch else {
                out.torn += 1;
                break;
            };
            let seq = b
                .column(0)
                .as_primitive::<datafusion::arrow::datatypes::UInt64Type>();
            let at = b.column(1).as_primitive::<Int64Type>();
            let topic = b.column(2).as_string::<i32>();
            let payload = b.column(3).as_binary::<i32>();
            let pkid = b.column(4).as_primitive::<UInt16Type>();
            for i in 0..b.num_rows() {
                let s = seq.value(i);
                out.next_seq = out.next_seq.max(s + 1);
                out.redeliveries
                    .note(s, pkid.value(i), topic.value(i), payload.value(i));
                if s >= from {
                    out.replay.push(Logged {
                        seq: s,
                        msg: Message {
                            topic: topic.value(i).to_string(),
                            payload: bytes::Bytes::copy_from_slice(payload.value(i)),
                            received_at: at.value(i),
                        },
                        pkid: pkid.value(i),
                    });
                }
            }
        }
    }
    out.replay.sort_by_key(|l| l.seq);
    out.replay.dedup_by_key(|l| l.seq);
    Ok(out)
}

/// Deletes the segments no longer needed once everything before `before` is checkpointed:
/// those whose messages are all before it, except the newest of them (kept for
/// [`Redeliveries`]).
pub fn truncate(dir: &Path, before: u64) -> std::io::Result<usize> {
    let segs = segments(dir)?;
    let mut removed = 0;
    // Segment i holds [first_i, first_{i+1}); it may go when segment i+2 starts at or
    // before `before`.
    for i in 0..segs.len() {
        match segs.get(i + 2) {
            Some((first, _)) if *first <= before => {
                std::fs::remove_file(&segs[i].1)?;
                removed += 1;
            }
            _ => break,
        }
    }
    Ok(removed)
}

/// Recognises a broker's redelivery of a message already in the log.
///
/// After a reconnect (or a restart) a broker sends again, with the DUP flag and their
/// original packet ids, the QoS 1 messages it has no acknowledgement for. Some of them may
/// already be logged: the engine wrote them, then lost the connection (or crashed) before
/// its acknowledgement went out. A message with DUP set whose packet id, topic and payload
/// equal a recently logged message's is that message. "Recently" is within
/// [`REDELIVERY_WINDOW`] logged messages: a broker reuses a packet id only once the
/// earlier message is acknowledged, and it numbers messages in order, so an older entry
/// with the same id is a different message (which the window keeps from matching when a
/// device repeats a payload).
pub struct Redeliveries {
    /// Per packet id (the index), the log position and identity of the last message
    /// logged with it; `NONE` when there was none. A table rather than a hash map: it is
    /// written for every message, and a broker numbers packets in order, so consecutive
    /// writes touch neighbouring entries (a hash map scattered them over 3 MB: 6 % of the
    /// engine's CPU at QoS 1).
    by_pkid: Box<[(u64, u64)]>,
}

const NONE: (u64, u64) = (u64::MAX, 0);

impl Default for Redeliveries {
    fn default() -> Self {
        Redeliveries {
            by_pkid: vec![NONE; 1 << 16].into_boxed_slice(),
        }
    }
}

/// How far back (in logged messages) a redelivery is looked for: more than any broker's
/// in-flight window (mosquitto's `max_inflight_messages` defaults to 20).
pub const REDELIVERY_WINDOW: u64 = 16_384;

fn identity(topic: &str, payload: &[u8]) -> u64 {
    // A fixed hasher: identities are rebuilt from the log after a restart.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    topic.hash(&mut h);
    payload.hash(&mut h);
    h.finish()
}

impl Redeliveries {
    pub fn note(&mut self, seq: u64, pkid: u16, topic: &str, payload: &[u8]) {
        if pkid != 0 {
            self.by_pkid[usize::from(pkid)] = (seq, identity(topic, payload));
        }
    }

    /// Whether a message the broker marked DUP is one already logged, `next_seq` being the
    /// log's next position.
    pub fn is_logged(&self, pkid: u16, topic: &str, payload: &[u8], next_seq: u64) -> bool {
        match self.by_pkid[usize::from(pkid)] {
            NONE => false,
            (seq, id) => {
                next_seq.saturating_sub(seq) <= REDELIVERY_WINDOW && id == identity(topic, payload)
            }
        }
    }
}
