//! The uplink's durable spool: every event is written ahead to disk before it
//! is sent, so that nothing is lost while the collector is unreachable or
//! slow, and events survive an agent restart (and, within the fsync bound
//! below, a crash or a power loss).
//!
//! # Layout
//!
//! `<dir>/critical/` and `<dir>/bulk/` (events are classed by
//! [`crate::outbox::is_bulk`]), each a sequence of append-only segment files
//! named by the id of their first record (`00000000000000001234.seg`, ids
//! count 0, 1, 2, ... per class, across agent runs), plus an `ack` file with
//! the id below which everything is acknowledged.
//!
//! A segment starts with a header: `"ZTSPOOL1"`, body length (u32 LE), CRC-32
//! of the body (u32 LE), body = boot id and agent version of the agent run
//! that wrote it (each a u16 LE length and UTF-8 bytes). A run never appends
//! to an older run's segment, so every record of a segment belongs to the
//! run named in its header: replayed events keep their `(boot_id, seq)`.
//! Records follow: payload length (u32 LE), CRC-32 (u32 LE) of length, id
//! and payload, record id (u64 LE), payload = the protobuf `Event`. The CRC
//! is CRC-32 (IEEE) through `crc32fast` (SIMD; about 10 GB/s here, so the
//! checksum costs nanoseconds per event).
//!
//! # Durability (fsync policy)
//!
//! Appends go to a user-space buffer, written to the file when it holds
//! 64 KiB or when the uplink flushes (every `fsync_interval_ms`, default
//! 200 ms, and on a clean shutdown); the same flush `fdatasync`s every file
//! written since the last one, off the uplink's task. So a crash of the agent
//! or a power loss costs at most the events of the last `fsync_interval_ms`
//! (plus the time the fsync itself takes) that the collector had not yet
//! acknowledged; a clean stop or restart costs nothing. The `ack` file is
//! rewritten (atomically, by rename) at the same flushes: losing it only
//! makes acknowledged events be sent again, which the collector deduplicates
//! on `(device_id, boot_id, seq)`.
//!
//! # Bounds
//!
//! Both classes share `max_bytes`. When an append would pass it, whole
//! segments go, oldest first: bulk segments first; critical segments only
//! when no bulk segment is left and the new event is critical (a new bulk
//! event is then dropped itself). Every event lost that way is counted per
//! class (`spool_full`) and the uplink reports it as a gap record: exact,
//! except that events of a dropped segment that were in flight are counted
//! as lost even if their batch is acknowledged afterwards (an over-report of
//! at most the in-flight window, only when the spool overflows while the
//! collector is reachable).
//!
//! # Bad input
//!
//! A record whose header or checksum does not match is skipped; the reader
//! resynchronises on the next record that checks, and the ids in between are
//! counted as lost (`spool_corrupt`), once. An unreadable segment header
//! loses the segment (its ids up to the next segment's first). At open, a
//! torn tail of the newest segment (a record cut short by a crash) is
//! truncated away and counted as one lost event.
//!
//! # Disk errors
//!
//! A failed write keeps the unwritten bytes in memory and retries at the next
//! flush; the records stay readable from memory meanwhile. When more than
//! [`MAX_UNWRITTEN`] bytes are waiting, or a segment cannot be created or
//! sealed, [`Spool::append`] fails and the caller keeps the event elsewhere
//! (the uplink falls back to its bounded memory queue, whose drops are
//! reported as `queue_full` gaps, and retries the spool a few seconds
//! later).
//!
//! # Why write-ahead (and not memory-first with spill)
//!
//! Measured with `cargo bench -p agent --bench spool` (exec events with
//! three ancestors, 2-core VM): the memory-only outbox cycle costs about
//! 0.5 µs per event, write-ahead about 1.0 µs (encode, CRC, buffered write),
//! replay from disk about 0.75 µs. The extra ~0.5 µs is small next to the
//! agent's measured 3-50 µs per event, and buys: the same loss bound for a
//! crash at any time (not only during outages), one ordered log with one
//! acknowledged position, and memory that no longer grows with an outage
//! (only a small decoded cache; the memory queue held up to 200k events).
//!
//! # Memory
//!
//! Appended events also stay in a bounded memory cache, as the protobuf bytes
//! written, until they are sent, so a connected agent never reads back what
//! it wrote: the disk is read only to replay (after a reconnect, a restart,
//! or when the cache overflowed during an outage). Neither path decodes: a
//! batch is assembled from the records' bytes ([`crate::encoded`]).

use std::{
    collections::{BTreeMap, VecDeque},
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use prost::Message as _;
use proto::telemetry::Event;
use tracing::{info, warn};

use crate::encoded::EncodedEvent;
use crate::outbox::is_bulk;

const SEGMENT_MAGIC: &[u8; 8] = b"ZTSPOOL1";
const SEGMENT_HEADER_FIXED: usize = 16;
const FRAME_HEADER: usize = 16;
/// No event comes near this; a longer length field is corruption.
const MAX_RECORD: usize = 16 << 20;
/// Appends are written to the file when this much is buffered.
const WRITE_BUFFER: usize = 64 * 1024;
/// Bytes the reader fetches at a time when replaying.
const READ_CHUNK: usize = 256 * 1024;
/// Unwritten bytes (disk full, write errors) beyond which appends fail.
pub const MAX_UNWRITTEN: usize = 4 << 20;
const ACK_FILE: &str = "ack";

/// The agent run that wrote a segment: replayed events are sent in batches
/// carrying it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunId {
    pub boot_id: String,
    pub agent_version: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Critical = 0,
    Bulk = 1,
}

impl Class {
    pub fn of(event: &Event) -> Class {
        if is_bulk(event) {
            Class::Bulk
        } else {
            Class::Critical
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Class::Critical => "critical",
            Class::Bulk => "bulk",
        }
    }
}

/// Sizes and paths of a spool.
#[derive(Clone, Debug)]
pub struct SpoolLimits {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub segment_bytes: u64,
    /// Bounds of the cache of record bytes (not yet sent), per class.
    pub cache_events: usize,
    pub cache_bytes: usize,
    /// How often the uplink flushes and fsyncs the spool.
    pub fsync_interval: std::time::Duration,
}

/// Events lost by the spool since the last [`Spool::take_lost`], per class
/// (`[critical, bulk]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpoolLosses {
    pub full: [u64; 2],
    pub corrupt: [u64; 2],
}

impl SpoolLosses {
    pub fn is_empty(&self) -> bool {
        *self == SpoolLosses::default()
    }
}

/// An event the spool could not take, and why: the caller keeps it
/// elsewhere.
#[derive(Debug)]
pub struct Refused {
    pub error: io::Error,
    pub event: Event,
}

/// A batch read from the spool: its events all belong to `run`.
#[derive(Debug)]
pub struct SpoolBatch {
    pub key: u64,
    pub run: Arc<RunId>,
    pub events: Vec<EncodedEvent>,
}

/// Files to `fdatasync`, taken at a flush; run off the async runtime.
#[derive(Debug, Default)]
pub struct SyncJob {
    files: Vec<File>,
    dirs: Vec<PathBuf>,
}

impl SyncJob {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dirs.is_empty()
    }

    pub fn run(self) -> io::Result<()> {
        for file in &self.files {
            file.sync_data()?;
        }
        for dir in &self.dirs {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Segment {
    first: u64,
    /// One past the last record's id (the active segment: the next id).
    end: u64,
    /// File length, buffered bytes included.
    bytes: u64,
    /// `None`: the header is unreadable, the segment is lost.
    run: Option<Arc<RunId>>,
    data_start: u64,
    path: PathBuf,
}

#[derive(Debug)]
struct Writer {
    file: File,
    buf: Vec<u8>,
    /// Bytes of the file on disk (the buffer goes after them).
    flushed: u64,
}

impl Writer {
    /// Writes the buffer; on an error keeps what was not written.
    fn flush(&mut self) -> io::Result<()> {
        let mut done = 0;
        let result = loop {
            if done == self.buf.len() {
                break Ok(());
            }
            match self
                .file
                .write_at(&self.buf[done..], self.flushed + done as u64)
            {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.buf.drain(..done);
        self.flushed += done as u64;
        result
    }
}

#[derive(Debug)]
struct Reader {
    seg_first: u64,
    file: File,
    offset: u64,
    buf: Vec<u8>,
    buf_start: u64,
}

impl Reader {
    /// `n` bytes at `off`, if the first `limit` bytes of the file hold them.
    fn bytes(&mut self, off: u64, n: usize, limit: u64) -> io::Result<Option<&[u8]>> {
        if off + n as u64 > limit {
            return Ok(None);
        }
        let have =
            off >= self.buf_start && off + n as u64 <= self.buf_start + self.buf.len() as u64;
        if !have {
            let want = (n.max(READ_CHUNK) as u64).min(limit - off) as usize;
            self.buf.resize(want, 0);
            self.file.read_exact_at(&mut self.buf, off)?;
            self.buf_start = off;
        }
        let at = (off - self.buf_start) as usize;
        Ok(Some(&self.buf[at..at + n]))
    }
}

#[derive(Debug)]
struct Cached {
    id: u64,
    event: EncodedEvent,
    size: usize,
    seg_first: u64,
    /// File offset just past the record.
    end_offset: u64,
}

/// One step of reading from disk.
enum Step {
    Record((u64, Arc<RunId>, EncodedEvent)),
    /// Moved on (skipped, changed segment); read again.
    Again,
    /// Nothing more is readable now.
    Stop,
}

/// What a frame at some offset is.
enum Frame {
    /// A record that checks: its id, payload range and length in the file.
    Record {
        id: u64,
        payload: (u64, usize),
        len: u64,
    },
    /// Not a record (corruption or a torn write).
    Bad,
    /// The readable part of the file ends first.
    End,
}

fn read_frame(reader: &mut Reader, off: u64, limit: u64, min_id: u64) -> io::Result<Frame> {
    let Some(head) = reader.bytes(off, FRAME_HEADER, limit)? else {
        return Ok(if off >= limit { Frame::End } else { Frame::Bad });
    };
    let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    let id = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    let len_bytes: [u8; 4] = head[0..4].try_into().expect("4 bytes");
    let id_bytes: [u8; 8] = head[8..16].try_into().expect("8 bytes");
    if len > MAX_RECORD || id < min_id {
        return Ok(Frame::Bad);
    }
    let Some(payload) = reader.bytes(off + FRAME_HEADER as u64, len, limit)? else {
        return Ok(Frame::Bad);
    };
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len_bytes);
    hasher.update(&id_bytes);
    hasher.update(payload);
    if hasher.finalize() != crc {
        return Ok(Frame::Bad);
    }
    Ok(Frame::Record {
        id,
        payload: (off + FRAME_HEADER as u64, len),
        len: (FRAME_HEADER + len) as u64,
    })
}

/// The next offset after `from` where a record with an id of at least
/// `min_id` checks, if any.
fn resync(reader: &mut Reader, from: u64, limit: u64, min_id: u64) -> io::Result<Option<u64>> {
    let mut off = from;
    while off + (FRAME_HEADER as u64) <= limit {
        if let Frame::Record { .. } = read_frame(reader, off, limit, min_id)? {
            return Ok(Some(off));
        }
        off += 1;
    }
    Ok(None)
}

fn segment_header(run: &RunId) -> Vec<u8> {
    let mut body = Vec::new();
    for s in [&run.boot_id, &run.agent_version] {
        let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        body.extend_from_slice(&(s.len() as u16).to_le_bytes());
        body.extend_from_slice(s);
    }
    let mut header = Vec::with_capacity(SEGMENT_HEADER_FIXED + body.len());
    header.extend_from_slice(SEGMENT_MAGIC);
    header.extend_from_slice(&(body.len() as u32).to_le_bytes());
    header.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    header.extend_from_slice(&body);
    header
}

/// The run and data offset of a segment file, `None` when its header does
/// not check.
fn read_segment_header(file: &File, len: u64) -> io::Result<Option<(RunId, u64)>> {
    if len < SEGMENT_HEADER_FIXED as u64 {
        return Ok(None);
    }
    let mut fixed = [0u8; SEGMENT_HEADER_FIXED];
    file.read_exact_at(&mut fixed, 0)?;
    if &fixed[..8] != SEGMENT_MAGIC {
        return Ok(None);
    }
    let body_len = u32::from_le_bytes(fixed[8..12].try_into().expect("4 bytes")) as u64;
    let crc = u32::from_le_bytes(fixed[12..16].try_into().expect("4 bytes"));
    if body_len > 4096 || SEGMENT_HEADER_FIXED as u64 + body_len > len {
        return Ok(None);
    }
    let mut body = vec![0u8; body_len as usize];
    file.read_exact_at(&mut body, SEGMENT_HEADER_FIXED as u64)?;
    if crc32fast::hash(&body) != crc {
        return Ok(None);
    }
    let mut fields = Vec::new();
    let mut at = 0usize;
    for _ in 0..2 {
        let Some(n) = body.get(at..at + 2) else {
            return Ok(None);
        };
        let n = u16::from_le_bytes([n[0], n[1]]) as usize;
        let Some(s) = body.get(at + 2..at + 2 + n) else {
            return Ok(None);
        };
        fields.push(String::from_utf8_lossy(s).into_owned());
        at += 2 + n;
    }
    let agent_version = fields.pop().unwrap_or_default();
    let boot_id = fields.pop().unwrap_or_default();
    Ok(Some((
        RunId {
            boot_id,
            agent_version,
        },
        SEGMENT_HEADER_FIXED as u64 + body_len,
    )))
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

/// One class's segments and cursors.
#[derive(Debug)]
struct Lane {
    class: Class,
    dir: PathBuf,
    segments: VecDeque<Segment>,
    /// The active segment (the last of `segments`) while this run appends.
    writer: Option<Writer>,
    /// Sealed files not yet synced.
    unsynced: Vec<File>,
    dir_dirty: bool,
    next_id: u64,
    /// The next id to hand out to a batch.
    sent: u64,
    /// A record read past a batch's end (another run), handed out next.
    peeked: Option<(u64, Arc<RunId>, EncodedEvent)>,
    in_flight: BTreeMap<u64, (u64, u64)>,
    /// The acknowledged position last persisted.
    persisted_ack: u64,
    reader: Option<Reader>,
    cache: VecDeque<Cached>,
    cache_bytes: usize,
    /// Corruption below this id has been counted.
    corrupt_counted_upto: u64,
    lost_full: u64,
    lost_corrupt: u64,
    /// Events dropped for room since the spool was opened.
    dropped_total: u64,
}

impl Lane {
    fn open(dir: PathBuf, class: Class) -> io::Result<Lane> {
        fs::create_dir_all(&dir)?;
        let mut firsts: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if let Some(first) = name.strip_suffix(".seg").and_then(|s| s.parse().ok()) {
                firsts.push((first, path));
            } else if name.ends_with(".tmp") {
                let _ = fs::remove_file(&path);
            }
        }
        firsts.sort();
        let mut lane = Lane {
            class,
            dir,
            segments: VecDeque::new(),
            writer: None,
            unsynced: Vec::new(),
            dir_dirty: false,
            next_id: 0,
            sent: 0,
            peeked: None,
            in_flight: BTreeMap::new(),
            persisted_ack: 0,
            reader: None,
            cache: VecDeque::new(),
            cache_bytes: 0,
            corrupt_counted_upto: 0,
            lost_full: 0,
            lost_corrupt: 0,
            dropped_total: 0,
        };
        let count = firsts.len();
        for (i, (first, path)) in firsts.iter().enumerate() {
            let file = File::open(path)?;
            let bytes = file.metadata()?.len();
            let header = read_segment_header(&file, bytes)?;
            let end = firsts.get(i + 1).map(|(f, _)| *f).unwrap_or(*first);
            let (run, data_start) = match header {
                Some((run, start)) => (Some(Arc::new(run)), start),
                None => (None, bytes),
            };
            lane.segments.push_back(Segment {
                first: *first,
                end,
                bytes,
                run,
                data_start,
                path: path.clone(),
            });
            if i + 1 == count {
                lane.recover_last()?;
            }
        }
        lane.next_id = lane.segments.back().map(|s| s.end).unwrap_or(0);
        let acked = read_ack(&lane.dir.join(ACK_FILE))
            .unwrap_or_else(|| lane.segments.front().map(|s| s.first).unwrap_or(0));
        if lane.segments.is_empty() {
            lane.next_id = acked;
        }
        let acked = acked.min(lane.next_id);
        lane.sent = acked;
        lane.persisted_ack = acked;
        lane.corrupt_counted_upto = acked;
        lane.delete_acked();
        Ok(lane)
    }

    /// Finds the end of the newest segment and cuts a torn tail away.
    fn recover_last(&mut self) -> io::Result<()> {
        let seg = self.segments.back_mut().expect("a segment");
        if seg.run.is_none() {
            // Unreadable header: nothing in it can be replayed.
            warn!(segment = %seg.path.display(), "spool segment header unreadable; segment lost");
            if seg.bytes > SEGMENT_HEADER_FIXED as u64 {
                self.lost_corrupt += 1;
            }
            let path = seg.path.clone();
            self.segments.pop_back();
            fs::remove_file(&path)?;
            return Ok(());
        }
        let file = OpenOptions::new().read(true).write(true).open(&seg.path)?;
        let mut reader = Reader {
            seg_first: seg.first,
            file,
            offset: seg.data_start,
            buf: Vec::new(),
            buf_start: 0,
        };
        let limit = seg.bytes;
        let mut off = seg.data_start;
        let mut next = seg.first;
        loop {
            match read_frame(&mut reader, off, limit, next)? {
                Frame::Record { id, len, .. } => {
                    next = id + 1;
                    off += len;
                }
                Frame::End => break,
                Frame::Bad => match resync(&mut reader, off + 1, limit, next)? {
                    // Corruption inside: the reader reports it.
                    Some(at) => off = at,
                    None => {
                        warn!(segment = %seg.path.display(), at = off, bytes = limit - off, "spool segment ends in a torn record; truncated");
                        reader.file.set_len(off)?;
                        reader.file.sync_all()?;
                        seg.bytes = off;
                        self.lost_corrupt += 1;
                        break;
                    }
                },
            }
        }
        seg.end = next;
        Ok(())
    }

    fn acked(&self) -> u64 {
        let mut acked = self.sent;
        if let Some((id, _, _)) = &self.peeked {
            acked = acked.min(*id);
        }
        for (start, _) in self.in_flight.values() {
            acked = acked.min(*start);
        }
        acked
    }

    fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    fn pending(&self) -> u64 {
        self.next_id - self.sent + u64::from(self.peeked.is_some())
    }

    fn depth(&self) -> u64 {
        self.next_id - self.acked()
    }

    /// Deletes sealed segments every record of which is acknowledged.
    fn delete_acked(&mut self) {
        let acked = self.acked();
        while let Some(seg) = self.segments.front() {
            let active = self.writer.is_some() && self.segments.len() == 1;
            if active || seg.end > acked {
                break;
            }
            // A sealed segment of this run may never have been read: any
            // open reader is on it or before.
            if self
                .reader
                .as_ref()
                .is_some_and(|r| r.seg_first == seg.first)
            {
                self.reader = None;
            }
            if let Err(err) = fs::remove_file(&seg.path) {
                warn!(segment = %seg.path.display(), error = %err, "cannot delete acknowledged spool segment");
            }
            self.segments.pop_front();
            self.dir_dirty = true;
        }
    }

    /// Drops the oldest segment for room; returns the events lost with it.
    fn drop_oldest(&mut self) -> u64 {
        let Some(seg) = self.segments.pop_front() else {
            return 0;
        };
        let acked = self.acked();
        let lost = seg.end.saturating_sub(seg.first.max(acked));
        if self.segments.is_empty() {
            self.writer = None;
        }
        if let Err(err) = fs::remove_file(&seg.path) {
            warn!(segment = %seg.path.display(), error = %err, "cannot delete spool segment");
        }
        self.dir_dirty = true;
        if self.sent < seg.end {
            self.sent = seg.end;
            self.reader = None;
        }
        if self.peeked.as_ref().is_some_and(|(id, _, _)| *id < seg.end) {
            self.peeked = None;
        }
        self.in_flight.retain(|_, (start, end)| {
            *start = (*start).max(seg.end);
            *start < *end
        });
        while self.cache.front().is_some_and(|c| c.id < seg.end) {
            let c = self.cache.pop_front().expect("front");
            self.cache_bytes -= c.size;
        }
        if self
            .reader
            .as_ref()
            .is_some_and(|r| r.seg_first == seg.first)
        {
            self.reader = None;
        }
        self.corrupt_counted_upto = self.corrupt_counted_upto.max(seg.end);
        self.lost_full += lost;
        self.dropped_total += lost;
        lost
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.writer {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }

    /// Seals the active segment: its bytes written, its file kept for the
    /// next sync.
    fn seal(&mut self) -> io::Result<()> {
        if let Some(w) = &mut self.writer {
            w.flush()?;
        }
        if let Some(w) = self.writer.take() {
            self.unsynced.push(w.file);
        }
        Ok(())
    }

    fn append(
        &mut self,
        event: Event,
        size: usize,
        run: &Arc<RunId>,
        limits: &SpoolLimits,
    ) -> Result<(), Box<Refused>> {
        if let Err(error) = self.prepare(size, run, limits) {
            return Err(Box::new(Refused { error, event }));
        }
        self.write_record(&event, size, limits);
        Ok(())
    }

    /// Makes the active segment ready for a record of `size` bytes.
    fn prepare(&mut self, size: usize, run: &Arc<RunId>, limits: &SpoolLimits) -> io::Result<()> {
        let frame = (FRAME_HEADER + size) as u64;
        if self
            .writer
            .as_ref()
            .is_some_and(|w| w.buf.len() + FRAME_HEADER + size > MAX_UNWRITTEN)
        {
            // The disk has not taken what it has for a while.
            self.flush()?;
        }
        let roll = match (&self.writer, self.segments.back()) {
            (Some(_), Some(seg)) => seg.bytes + frame > limits.segment_bytes && seg.end > seg.first,
            _ => true,
        };
        if roll {
            self.seal()?;
            let header = segment_header(run);
            let path = self.dir.join(segment_name(self.next_id));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)?;
            self.dir_dirty = true;
            self.segments.push_back(Segment {
                first: self.next_id,
                end: self.next_id,
                bytes: header.len() as u64,
                run: Some(run.clone()),
                data_start: header.len() as u64,
                path,
            });
            self.writer = Some(Writer {
                file,
                buf: header,
                flushed: 0,
            });
        }
        Ok(())
    }

    fn write_record(&mut self, event: &Event, size: usize, limits: &SpoolLimits) {
        let frame = (FRAME_HEADER + size) as u64;
        let writer = self.writer.as_mut().expect("an active segment");
        let seg = self.segments.back_mut().expect("an active segment");
        let id = self.next_id;
        let start = writer.buf.len();
        writer.buf.extend_from_slice(&[0u8; FRAME_HEADER]);
        // The length is known (`size`): encode without computing it again.
        writer.buf.reserve(size);
        event.encode_raw(&mut writer.buf);
        let len = writer.buf.len() - start - FRAME_HEADER;
        debug_assert_eq!(len, size);
        let len_bytes = (len as u32).to_le_bytes();
        let id_bytes = id.to_le_bytes();
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&len_bytes);
        hasher.update(&id_bytes);
        hasher.update(&writer.buf[start + FRAME_HEADER..]);
        let crc = hasher.finalize();
        let payload =
            EncodedEvent::from_bytes(Bytes::copy_from_slice(&writer.buf[start + FRAME_HEADER..]));
        writer.buf[start..start + 4].copy_from_slice(&len_bytes);
        writer.buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        writer.buf[start + 8..start + 16].copy_from_slice(&id_bytes);
        seg.bytes += frame;
        seg.end = id + 1;
        let end_offset = seg.bytes;
        let seg_first = seg.first;
        self.next_id += 1;
        if writer.buf.len() >= WRITE_BUFFER {
            if let Err(err) = writer.flush() {
                // Kept in memory; retried at the next flush.
                warn!(class = self.class.name(), error = %err, unwritten = writer.buf.len(), "spool write failed");
            }
        }
        // Keep its bytes for sending, within the cache's bounds; only
        // records already on disk may leave the cache unsent.
        self.cache.push_back(Cached {
            id,
            event: payload,
            size,
            seg_first,
            end_offset,
        });
        self.cache_bytes += size;
        let flushed = self
            .writer
            .as_ref()
            .map(|w| (self.segments.back().map(|s| s.first), w.flushed));
        while self.cache.len() > limits.cache_events || self.cache_bytes > limits.cache_bytes {
            let front = self.cache.front().expect("non-empty");
            let on_disk = match flushed {
                Some((Some(active), flushed)) if front.seg_first == active => {
                    front.end_offset <= flushed
                }
                _ => true,
            };
            if !on_disk {
                break;
            }
            let c = self.cache.pop_front().expect("non-empty");
            self.cache_bytes -= c.size;
        }
    }

    /// The next record to send and its run, skipping (and counting) what is
    /// corrupt. `None`: nothing more is readable now.
    fn next_record(&mut self) -> Option<(u64, Arc<RunId>, EncodedEvent)> {
        if let Some(peeked) = self.peeked.take() {
            return Some(peeked);
        }
        loop {
            if self.sent >= self.next_id {
                return None;
            }
            // Records dropped from the cache are older than those in it.
            while self.cache.front().is_some_and(|c| c.id < self.sent) {
                let c = self.cache.pop_front().expect("front");
                self.cache_bytes -= c.size;
            }
            if let Some(front) = self.cache.front() {
                if front.id == self.sent {
                    let c = self.cache.pop_front().expect("front");
                    self.cache_bytes -= c.size;
                    self.sent += 1;
                    self.reader = None;
                    let run = self
                        .segments
                        .iter()
                        .rev()
                        .find(|s| s.first == c.seg_first)
                        .and_then(|s| s.run.clone())?;
                    return Some((c.id, run, c.event));
                }
            }
            match self.read_disk() {
                Ok(Step::Record(record)) => return Some(record),
                Ok(Step::Again) => {}
                Ok(Step::Stop) => return None,
                Err(err) => {
                    warn!(class = self.class.name(), error = %err, "cannot read the spool; will retry");
                    self.reader = None;
                    return None;
                }
            }
        }
    }

    fn count_corrupt(&mut self, from: u64, to: u64) {
        let from = from.max(self.corrupt_counted_upto);
        if to > from {
            warn!(
                class = self.class.name(),
                lost = to - from,
                "corrupt spool records skipped"
            );
            self.lost_corrupt += to - from;
            self.corrupt_counted_upto = to;
        }
    }

    /// One step of reading the record `sent` (or the next one that
    /// checks) from disk.
    fn read_disk(&mut self) -> io::Result<Step> {
        {
            // The segment holding `sent`, or the first after it.
            let Some(index) = self.segments.iter().position(|s| s.end > self.sent) else {
                self.count_corrupt(self.sent, self.next_id);
                self.sent = self.next_id;
                return Ok(Step::Stop);
            };
            let seg = &self.segments[index];
            let (seg_first, seg_end, data_start, path) =
                (seg.first, seg.end, seg.data_start, seg.path.clone());
            let Some(run) = seg.run.clone() else {
                let from = self.sent.max(seg_first);
                self.count_corrupt(from, seg_end);
                self.sent = seg_end;
                self.reader = None;
                return Ok(Step::Again);
            };
            if self.sent < seg_first {
                // Ids between segments were dropped for room.
                self.sent = seg_first;
            }
            let active = self.writer.is_some() && index + 1 == self.segments.len();
            if active {
                if self.cache.front().is_some_and(|c| c.id == self.sent) {
                    return Ok(Step::Again);
                }
                // What was appended must be on disk before it is read back.
                self.flush()?;
            }
            let limit = if active {
                self.writer.as_ref().map(|w| w.flushed).unwrap_or(0)
            } else {
                self.segments[index].bytes
            };
            if self
                .reader
                .as_ref()
                .is_none_or(|r| r.seg_first != seg_first)
            {
                self.reader = Some(Reader {
                    seg_first,
                    file: File::open(&path)?,
                    offset: data_start,
                    buf: Vec::new(),
                    buf_start: 0,
                });
            }
            let reader = self.reader.as_mut().expect("a reader");
            let off = reader.offset;
            match read_frame(reader, off, limit, seg_first)? {
                Frame::Record { id, payload, len } if id < self.sent => {
                    let _ = payload;
                    reader.offset += len;
                }
                Frame::Record { id, payload, len } => {
                    reader.offset += len;
                    let (at, n) = payload;
                    // The frame checked, so its payload is in the buffer.
                    let bytes = reader.bytes(at, n, limit)?.map(Bytes::copy_from_slice);
                    let from = self.sent;
                    self.count_corrupt(from, id);
                    self.sent = id + 1;
                    match bytes {
                        Some(bytes) => {
                            return Ok(Step::Record((id, run, EncodedEvent::from_bytes(bytes))))
                        }
                        None => self.count_corrupt(id, id + 1),
                    }
                }
                Frame::End if active => return Ok(Step::Stop),
                Frame::End => {
                    // The segment ends before its last id: lost.
                    let from = self.sent;
                    self.count_corrupt(from, seg_end);
                    self.sent = seg_end;
                    self.reader = None;
                }
                Frame::Bad => match resync(reader, off + 1, limit, self.sent)? {
                    Some(at) => reader.offset = at,
                    None if active => {
                        // Cannot happen for what this run wrote; give up on
                        // the rest of the segment.
                        reader.offset = limit;
                        return Ok(Step::Stop);
                    }
                    None => reader.offset = limit,
                },
            }
        }
        Ok(Step::Again)
    }

    fn write_ack(&mut self) -> io::Result<()> {
        let acked = self.acked();
        if acked == self.persisted_ack {
            return Ok(());
        }
        let mut bytes = acked.to_le_bytes().to_vec();
        bytes.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
        let tmp = self.dir.join("ack.tmp");
        fs::write(&tmp, &bytes)?;
        fs::rename(&tmp, self.dir.join(ACK_FILE))?;
        self.persisted_ack = acked;
        Ok(())
    }
}

fn read_ack(path: &Path) -> Option<u64> {
    let bytes = fs::read(path).ok()?;
    if bytes.len() != 12 {
        return None;
    }
    let crc = u32::from_le_bytes(bytes[8..12].try_into().ok()?);
    (crc32fast::hash(&bytes[..8]) == crc)
        .then(|| u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")))
}

/// The two classes' spools under one size bound.
#[derive(Debug)]
pub struct Spool {
    lanes: [Lane; 2],
    limits: SpoolLimits,
    run: Arc<RunId>,
    header_len: u64,
    next_key: u64,
    /// Batch keys and the lane ranges they cover.
    batches: BTreeMap<u64, [Option<(u64, u64)>; 2]>,
}

impl Spool {
    /// Opens (or creates) the spool in `limits.dir`, recovering what a
    /// previous run left; this run appends as `run`.
    pub fn open(limits: SpoolLimits, run: RunId) -> io::Result<Spool> {
        let critical = Lane::open(limits.dir.join("critical"), Class::Critical)?;
        let bulk = Lane::open(limits.dir.join("bulk"), Class::Bulk)?;
        let spool = Spool {
            lanes: [critical, bulk],
            limits,
            header_len: segment_header(&run).len() as u64,
            run: Arc::new(run),
            next_key: 1,
            batches: BTreeMap::new(),
        };
        let (events, bytes) = spool.depth();
        if events > 0 {
            info!(dir = %spool.limits.dir.display(), events, bytes, "spool holds events from before; replaying them");
        }
        Ok(spool)
    }

    pub fn run(&self) -> &Arc<RunId> {
        &self.run
    }

    pub fn limits(&self) -> &SpoolLimits {
        &self.limits
    }

    pub fn bytes(&self) -> u64 {
        self.lanes.iter().map(Lane::bytes).sum()
    }

    /// Events not yet acknowledged, and the spool's bytes on disk.
    pub fn depth(&self) -> (u64, u64) {
        (self.lanes.iter().map(Lane::depth).sum(), self.bytes())
    }

    /// Events not yet handed to a batch.
    pub fn pending(&self) -> u64 {
        self.lanes.iter().map(Lane::pending).sum()
    }

    pub fn in_flight_batches(&self) -> usize {
        self.batches.len()
    }

    /// Appends an event; returns how many events were dropped for it (whole
    /// oldest segments, bulk first, or the event itself). An error means
    /// the event was not taken: the caller keeps it elsewhere.
    pub fn append(&mut self, event: Event) -> Result<u64, Box<Refused>> {
        self.append_as(event, true)
    }

    /// Appends a record of the agent's own (a gap record) to the critical
    /// class, whatever the bound: reporting a loss never causes another.
    pub fn append_report(&mut self, event: Event) -> Result<(), Box<Refused>> {
        self.append_as(event, false).map(|_| ())
    }

    fn append_as(&mut self, event: Event, bounded: bool) -> Result<u64, Box<Refused>> {
        let class = if bounded {
            Class::of(&event)
        } else {
            Class::Critical
        };
        let size = event.encoded_len();
        // Room for a new segment's header too, in case this one starts it.
        let need = (FRAME_HEADER + size) as u64 + self.header_len;
        let mut dropped = 0;
        if bounded {
            while self.bytes() + need > self.limits.max_bytes {
                if !self.lanes[Class::Bulk as usize].segments.is_empty() {
                    dropped += self.lanes[Class::Bulk as usize].drop_oldest();
                } else if class == Class::Critical
                    && !self.lanes[Class::Critical as usize].segments.is_empty()
                {
                    dropped += self.lanes[Class::Critical as usize].drop_oldest();
                } else {
                    // Nothing may go for it: the new event is the one lost.
                    self.lanes[class as usize].lost_full += 1;
                    self.lanes[class as usize].dropped_total += 1;
                    return Ok(dropped + 1);
                }
            }
        }
        let run = self.run.clone();
        self.lanes[class as usize].append(event, size, &run, &self.limits)?;
        Ok(dropped)
    }

    /// Up to `max_events` events of one run as the next batch, critical
    /// first.
    pub fn next_batch(&mut self, max_events: usize) -> Option<SpoolBatch> {
        let mut events = Vec::new();
        let mut run: Option<Arc<RunId>> = None;
        let mut ranges = [None, None];
        for class in [Class::Critical, Class::Bulk] {
            let lane = &mut self.lanes[class as usize];
            while events.len() < max_events {
                let Some((id, record_run, event)) = lane.next_record() else {
                    break;
                };
                if run.as_ref().is_some_and(|r| **r != *record_run) {
                    lane.peeked = Some((id, record_run, event));
                    break;
                }
                run.get_or_insert(record_run);
                let range: &mut Option<(u64, u64)> = &mut ranges[class as usize];
                match range {
                    Some((_, end)) => *end = id + 1,
                    None => *range = Some((id, id + 1)),
                }
                events.push(event);
            }
        }
        let run = run?;
        let key = self.next_key;
        self.next_key += 1;
        for (class, range) in ranges.iter().enumerate() {
            if let Some(range) = range {
                self.lanes[class].in_flight.insert(key, *range);
            }
        }
        self.batches.insert(key, ranges);
        Some(SpoolBatch { key, run, events })
    }

    /// The collector stored batch `key`; segments it completes are deleted.
    pub fn ack(&mut self, key: u64) -> bool {
        if self.batches.remove(&key).is_none() {
            return false;
        }
        for lane in &mut self.lanes {
            lane.in_flight.remove(&key);
            lane.delete_acked();
        }
        true
    }

    /// The connection broke: everything not acknowledged is sent again, in
    /// order.
    pub fn requeue_in_flight(&mut self) {
        self.batches.clear();
        for lane in &mut self.lanes {
            let acked = lane.acked();
            lane.in_flight.clear();
            lane.peeked = None;
            lane.sent = acked;
            lane.reader = None;
        }
    }

    /// Losses since the last call.
    pub fn take_lost(&mut self) -> SpoolLosses {
        let mut losses = SpoolLosses::default();
        for (i, lane) in self.lanes.iter_mut().enumerate() {
            losses.full[i] = std::mem::take(&mut lane.lost_full);
            losses.corrupt[i] = std::mem::take(&mut lane.lost_corrupt);
        }
        losses
    }

    /// Writes buffered records and the acknowledged positions; returns the
    /// files to `fdatasync` (run it off the async runtime). On an error the
    /// unwritten bytes stay buffered for the next flush.
    pub fn flush(&mut self) -> io::Result<SyncJob> {
        let mut job = SyncJob::default();
        let mut first_error = None;
        for lane in &mut self.lanes {
            if let Err(err) = lane.flush() {
                first_error.get_or_insert(err);
            }
            if let Err(err) = lane.write_ack() {
                first_error.get_or_insert(err);
            }
            job.files.append(&mut lane.unsynced);
            if let Some(w) = &lane.writer {
                if let Ok(file) = w.file.try_clone() {
                    job.files.push(file);
                }
            }
            if std::mem::take(&mut lane.dir_dirty) {
                job.dirs.push(lane.dir.clone());
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(job),
        }
    }

    /// Flushes and syncs everything, for a clean stop.
    pub fn close(&mut self) -> io::Result<()> {
        self.flush()?.run()
    }

    /// Events dropped for room since the spool was opened,
    /// `[critical, bulk]`.
    pub fn dropped_totals(&self) -> [u64; 2] {
        [self.lanes[0].dropped_total, self.lanes[1].dropped_total]
    }

    /// Bytes appended but not yet written to the files.
    pub fn unwritten(&self) -> usize {
        self.lanes
            .iter()
            .filter_map(|l| l.writer.as_ref())
            .map(|w| w.buf.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::telemetry::event::Kind;

    fn limits(dir: &Path, max_bytes: u64, segment_bytes: u64) -> SpoolLimits {
        SpoolLimits {
            dir: dir.to_owned(),
            max_bytes,
            segment_bytes,
            cache_events: 1_000,
            cache_bytes: 1 << 20,
            fsync_interval: std::time::Duration::from_millis(200),
        }
    }

    fn run(boot: &str) -> RunId {
        RunId {
            boot_id: boot.to_owned(),
            agent_version: "0.1.0".to_owned(),
        }
    }

    fn critical(seq: u64) -> Event {
        Event {
            seq,
            time_unix_ns: 1_700_000_000_000_000_000 + seq,
            kind: Some(Kind::Exec(proto::telemetry::ProcessExec {
                pid: seq as u32,
                filename: "/usr/bin/true".into(),
                argv: vec!["true".into(), format!("{seq}")],
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn bulk(seq: u64) -> Event {
        Event {
            seq,
            time_unix_ns: 1_700_000_000_000_000_000 + seq,
            kind: Some(Kind::File(proto::telemetry::FileActivity {
                action: "open_write".into(),
                path: format!("/tmp/file-{seq}"),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn seqs(events: &[EncodedEvent]) -> Vec<u64> {
        events
            .iter()
            .map(|e| e.decode().expect("an event").seq)
            .collect()
    }

    /// Every batch until the spool has nothing more, acknowledged.
    fn drain(spool: &mut Spool, max: usize) -> Vec<(String, Vec<u64>)> {
        let mut out = Vec::new();
        while let Some(batch) = spool.next_batch(max) {
            out.push((batch.run.boot_id.clone(), seqs(&batch.events)));
            assert!(spool.ack(batch.key));
        }
        out
    }

    fn all_seqs(batches: &[(String, Vec<u64>)]) -> Vec<u64> {
        batches.iter().flat_map(|(_, s)| s.clone()).collect()
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = ["critical", "bulk"]
            .iter()
            .flat_map(|class| fs::read_dir(dir.join(class)).into_iter().flatten())
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn events_come_out_in_order_critical_first_and_acks_delete_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(limits(dir.path(), 1 << 20, 4096), run("a")).unwrap();
        for seq in 1..=300 {
            let event = if seq % 3 == 0 {
                bulk(seq)
            } else {
                critical(seq)
            };
            assert_eq!(spool.append(event).unwrap(), 0);
        }
        spool.flush().unwrap().run().unwrap();
        assert!(segment_files(dir.path()).len() > 2, "several segments");
        let first = spool.next_batch(250).unwrap();
        let expected: Vec<u64> = (1..=300)
            .filter(|s| s % 3 != 0)
            .chain((1..=300).filter(|s| s % 3 == 0).take(50))
            .collect();
        assert_eq!(
            seqs(&first.events),
            expected,
            "critical first, each in order"
        );
        assert_eq!(*first.run, run("a"));
        let rest = drain(&mut spool, 1000);
        assert_eq!(
            all_seqs(&rest),
            (151..=300).filter(|s| s % 3 == 0).collect::<Vec<_>>()
        );
        assert_eq!(spool.pending(), 0);
        assert!(spool.ack(first.key));
        assert!(!spool.ack(first.key), "acknowledged once");
        assert_eq!(spool.depth().0, 0);
        // Only the segments still written to remain.
        assert_eq!(
            segment_files(dir.path()).len(),
            2,
            "{:?}",
            segment_files(dir.path())
        );
    }

    #[test]
    fn a_restart_replays_unacknowledged_events_under_their_own_run() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path(), 1 << 20, 4096);
        {
            let mut spool = Spool::open(l.clone(), run("first")).unwrap();
            for seq in 1..=100 {
                spool.append(critical(seq)).unwrap();
            }
            spool.append(bulk(101)).unwrap();
            // 1..=40 acknowledged; 41..=60 in flight when the agent stops.
            let acked = spool.next_batch(40).unwrap();
            assert!(spool.ack(acked.key));
            let _in_flight = spool.next_batch(20).unwrap();
            spool.close().unwrap();
        }
        let mut spool = Spool::open(l, run("second")).unwrap();
        assert_eq!(spool.depth().0, 61);
        for seq in 1..=5 {
            spool.append(critical(seq)).unwrap();
        }
        let batches = drain(&mut spool, 30);
        let first: Vec<u64> = batches
            .iter()
            .filter(|(b, _)| b == "first")
            .flat_map(|(_, s)| s.clone())
            .collect();
        let second: Vec<u64> = batches
            .iter()
            .filter(|(b, _)| b == "second")
            .flat_map(|(_, s)| s.clone())
            .collect();
        let mut expected: Vec<u64> = (41..=100).collect();
        expected.push(101);
        assert_eq!(first, expected, "exactly the unacknowledged ones, in order");
        assert_eq!(second, vec![1, 2, 3, 4, 5]);
        assert!(
            batches
                .iter()
                .all(|(b, s)| !s.is_empty() && (b == "first" || b == "second")),
            "a batch never mixes runs"
        );
        assert_eq!(spool.take_lost(), SpoolLosses::default());
    }

    #[test]
    fn a_broken_connection_resends_in_flight_events_in_order() {
        let dir = tempfile::tempdir().unwrap();
        // A tiny cache: most events are read back from disk.
        let mut l = limits(dir.path(), 1 << 20, 2048);
        l.cache_events = 4;
        let mut spool = Spool::open(l, run("a")).unwrap();
        for seq in 1..=50 {
            spool.append(critical(seq)).unwrap();
        }
        let b1 = spool.next_batch(10).unwrap();
        let _b2 = spool.next_batch(10).unwrap();
        let b3 = spool.next_batch(10).unwrap();
        assert!(spool.ack(b1.key));
        assert!(spool.ack(b3.key), "acknowledged out of order");
        spool.requeue_in_flight();
        assert!(!spool.ack(b3.key));
        let again = drain(&mut spool, 100);
        assert_eq!(all_seqs(&again), (11..=50).collect::<Vec<_>>());
    }

    #[test]
    fn a_corrupt_record_is_skipped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path(), 1 << 20, 1 << 20);
        {
            let mut spool = Spool::open(l.clone(), run("a")).unwrap();
            for seq in 1..=20 {
                spool.append(critical(seq)).unwrap();
            }
            spool.close().unwrap();
        }
        // Flip a byte in the payload of the 10th record.
        let file = &segment_files(dir.path())[0];
        let mut bytes = fs::read(file).unwrap();
        let (_, start) = read_segment_header(&File::open(file).unwrap(), bytes.len() as u64)
            .unwrap()
            .unwrap();
        let mut off = start as usize;
        for _ in 0..9 {
            let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            off += FRAME_HEADER + len;
        }
        bytes[off + FRAME_HEADER + 3] ^= 0x55;
        fs::write(file, &bytes).unwrap();

        let mut spool = Spool::open(l, run("b")).unwrap();
        let got = all_seqs(&drain(&mut spool, 100));
        let expected: Vec<u64> = (1..=20).filter(|s| *s != 10).collect();
        assert_eq!(got, expected);
        assert_eq!(spool.take_lost().corrupt, [1, 0]);
        spool.requeue_in_flight();
        assert!(spool.take_lost().is_empty(), "reported once");

        // A smashed header (length and id) too: the reader resynchronises.
        drop(spool);
    }

    #[test]
    fn a_smashed_record_header_costs_only_that_record() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path(), 1 << 20, 1 << 20);
        {
            let mut spool = Spool::open(l.clone(), run("a")).unwrap();
            for seq in 1..=20 {
                spool.append(critical(seq)).unwrap();
            }
            spool.close().unwrap();
        }
        let file = &segment_files(dir.path())[0];
        let mut bytes = fs::read(file).unwrap();
        let (_, start) = read_segment_header(&File::open(file).unwrap(), bytes.len() as u64)
            .unwrap()
            .unwrap();
        let mut off = start as usize;
        for _ in 0..4 {
            let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            off += FRAME_HEADER + len;
        }
        bytes[off..off + 16].copy_from_slice(&[0xff; 16]);
        fs::write(file, &bytes).unwrap();
        let mut spool = Spool::open(l, run("b")).unwrap();
        let got = all_seqs(&drain(&mut spool, 7));
        assert_eq!(got, (1..=20).filter(|s| *s != 5).collect::<Vec<_>>());
        assert_eq!(spool.take_lost().corrupt, [1, 0]);
    }

    #[test]
    fn a_torn_tail_is_truncated_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path(), 1 << 20, 1 << 20);
        {
            let mut spool = Spool::open(l.clone(), run("a")).unwrap();
            for seq in 1..=10 {
                spool.append(critical(seq)).unwrap();
            }
            spool.close().unwrap();
        }
        let file = segment_files(dir.path())[0].clone();
        let full = fs::metadata(&file).unwrap().len();
        // A crash in the middle of writing the last record.
        let f = OpenOptions::new().write(true).open(&file).unwrap();
        f.set_len(full - 7).unwrap();
        drop(f);
        let mut spool = Spool::open(l.clone(), run("b")).unwrap();
        let cut = fs::metadata(&file).unwrap().len();
        assert!(cut < full - 7, "the torn record is gone from the file");
        assert_eq!(spool.take_lost().corrupt, [1, 0]);
        spool.append(critical(11)).unwrap();
        let got = drain(&mut spool, 100);
        assert_eq!(
            got,
            vec![
                ("a".to_owned(), (1..=9).collect()),
                ("b".to_owned(), vec![11])
            ]
        );
        assert!(spool.take_lost().is_empty(), "counted once");
        spool.close().unwrap();
        // And it opens cleanly again.
        let mut spool = Spool::open(l, run("c")).unwrap();
        assert!(spool.next_batch(10).is_none());
        assert!(spool.take_lost().is_empty());
    }

    #[test]
    fn a_full_spool_drops_the_oldest_bulk_events_first_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let max = 16 * 1024;
        let mut spool = Spool::open(limits(dir.path(), max, 2048), run("a")).unwrap();
        let mut dropped = 0;
        for seq in 1..=2000 {
            let event = if seq % 10 == 0 {
                critical(seq)
            } else {
                bulk(seq)
            };
            dropped += spool.append(event).unwrap();
            assert!(spool.bytes() <= max, "bound kept: {}", spool.bytes());
        }
        spool.flush().unwrap().run().unwrap();
        let on_disk: u64 = segment_files(dir.path())
            .iter()
            .map(|f| fs::metadata(f).unwrap().len())
            .sum();
        assert!(on_disk <= max, "files {on_disk} within {max}");
        let lost = spool.take_lost();
        assert_eq!(lost.full[0], 0, "no critical event lost");
        assert!(lost.full[1] > 0);
        assert_eq!(lost.full[1], dropped);
        let got = all_seqs(&drain(&mut spool, 10_000));
        let critical_got: Vec<u64> = got.iter().copied().filter(|s| s % 10 == 0).collect();
        assert_eq!(critical_got, (1..=200).map(|i| i * 10).collect::<Vec<_>>());
        let bulk_got: Vec<u64> = got.iter().copied().filter(|s| s % 10 != 0).collect();
        assert_eq!(bulk_got.len() as u64 + lost.full[1], 1800, "exact count");
        // The newest bulk events are the ones kept.
        let newest: Vec<u64> = (1..=2000)
            .filter(|s| s % 10 != 0)
            .rev()
            .take(bulk_got.len())
            .collect();
        assert_eq!(bulk_got, newest.into_iter().rev().collect::<Vec<_>>());
    }

    #[test]
    fn critical_events_alone_fill_the_spool_then_the_oldest_critical_go() {
        let dir = tempfile::tempdir().unwrap();
        let max = 8 * 1024;
        let mut spool = Spool::open(limits(dir.path(), max, 2048), run("a")).unwrap();
        for seq in 1..=1000 {
            spool.append(critical(seq)).unwrap();
            assert!(spool.bytes() <= max);
        }
        let lost_critical = spool.take_lost().full[0];
        assert!(lost_critical > 0);
        // Bulk events never displace a critical one: they go themselves.
        for seq in 1001..=1200 {
            spool.append(bulk(seq)).unwrap();
        }
        let lost = spool.take_lost();
        assert_eq!(lost.full[0], 0, "no critical event displaced by bulk");
        assert!(lost.full[1] > 0);
        let got = all_seqs(&drain(&mut spool, 10_000));
        let critical_got = got.iter().filter(|s| **s <= 1000).count() as u64;
        let bulk_got = got.iter().filter(|s| **s > 1000).count() as u64;
        assert_eq!(critical_got + lost_critical, 1000);
        assert_eq!(bulk_got + lost.full[1], 200);
        assert!(got.contains(&1000), "the newest are kept");
    }

    #[test]
    fn gap_reports_pass_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let max = 8 * 1024;
        let mut spool = Spool::open(limits(dir.path(), max, 2048), run("a")).unwrap();
        for seq in 1..=1000 {
            spool.append(critical(seq)).unwrap();
        }
        let gap = crate::sensors::gap_event(1001, "critical", "spool_full", 5, 1, 2);
        spool.append_report(gap).unwrap();
        let got = all_seqs(&drain(&mut spool, 10_000));
        assert_eq!(got.last(), Some(&1001));
    }

    #[test]
    fn fully_acknowledged_spool_leaves_nothing_to_replay() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path(), 1 << 20, 2048);
        {
            let mut spool = Spool::open(l.clone(), run("a")).unwrap();
            for seq in 1..=200 {
                spool.append(bulk(seq)).unwrap();
            }
            drain(&mut spool, 64);
            spool.close().unwrap();
        }
        let mut spool = Spool::open(l, run("b")).unwrap();
        assert_eq!(spool.depth().0, 0);
        assert!(spool.next_batch(10).is_none());
        assert!(
            segment_files(dir.path()).is_empty(),
            "acknowledged segments deleted at open"
        );
    }

    /// Random appends, batches, out-of-order acks and reconnects: whatever
    /// is pending can always be batched, and every event is delivered.
    #[test]
    fn random_interleavings_never_stall_or_lose() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = limits(dir.path(), 1 << 30, 8192);
        l.cache_events = 50;
        let mut spool = Spool::open(l, run("a")).unwrap();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut in_flight: Vec<(u64, Vec<u64>)> = Vec::new();
        let mut delivered = std::collections::BTreeSet::new();
        let mut seq = 0;
        for _ in 0..20_000 {
            match next() % 10 {
                0..=4 => {
                    seq += 1;
                    let event = if next() % 3 == 0 {
                        bulk(seq)
                    } else {
                        critical(seq)
                    };
                    spool.append(event).unwrap();
                }
                5 | 6 => {
                    if in_flight.len() < 16 {
                        let pending = spool.pending();
                        match spool.next_batch(1 + (next() % 40) as usize) {
                            Some(batch) => in_flight.push((batch.key, seqs(&batch.events))),
                            None => assert_eq!(pending, 0, "pending but nothing to send"),
                        }
                    }
                }
                7 | 8 => {
                    if !in_flight.is_empty() {
                        let i = (next() as usize) % in_flight.len();
                        let (key, seqs) = in_flight.swap_remove(i);
                        assert!(spool.ack(key));
                        delivered.extend(seqs);
                    }
                }
                _ => {
                    if next() % 8 == 0 {
                        spool.requeue_in_flight();
                        in_flight.clear();
                    }
                }
            }
        }
        for (key, seqs) in in_flight.drain(..) {
            assert!(spool.ack(key));
            delivered.extend(seqs);
        }
        for (_, seqs) in drain(&mut spool, 100) {
            delivered.extend(seqs);
        }
        assert_eq!(spool.pending(), 0);
        assert_eq!(delivered.len() as u64, seq, "every event delivered");
        assert!(spool.take_lost().is_empty());
    }

    /// A disk that refuses writes: the spool keeps what it took in memory,
    /// then refuses appends; the queue falls back to memory and loses
    /// nothing it could hold.
    #[test]
    fn a_disk_that_refuses_writes_falls_back_to_memory() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path(), 1 << 30, 16 << 20);
        let spool = Spool::open(l, run("a")).unwrap();
        // The first segment's file is /dev/full: every write is ENOSPC.
        std::os::unix::fs::symlink(
            "/dev/full",
            dir.path().join("critical").join(segment_name(0)),
        )
        .unwrap();
        let memory = crate::outbox::Outbox::with_limits(200_000, 64 << 20);
        let mut queue = crate::outbox::Queue::new(memory, Some(spool));
        let n = 100_000;
        for seq in 1..=n {
            let (dropped, _) = queue.push(critical(seq));
            assert_eq!(dropped, 0);
        }
        assert!(queue.spool_errors() >= 1, "the failure is noticed");
        assert!(queue.flush().is_err(), "and reported at flush");
        let mut got = Vec::new();
        while let Some(batch) = queue.next_batch(512) {
            got.extend(seqs(&batch.events));
            assert!(queue.ack(batch.seq));
        }
        got.sort_unstable();
        assert_eq!(
            got,
            (1..=n).collect::<Vec<_>>(),
            "every event delivered once"
        );
    }
}
