//! The session's output in two lanes, so that no stream waits behind
//! another's bulk (PROTOCOL.md §6.1).
//!
//! - The **urgent** lane takes control frames, HELLOs, and small DATA of a
//!   stream that has nothing in the bulk lane.
//! - The **bulk** lane takes large DATA, and every frame of a stream that
//!   has bytes there already (a stream's frames never overtake each other).
//!
//! [`TxQueue::poll`] hands out urgent bytes first, then bulk bytes, but
//! never switches lanes in the middle of a frame; bulk is handed out in
//! whole frames, as much as the caller allows (the channel's in-flight
//! budget). Bytes below this point (socket buffers, QEMU, the peer's input)
//! cannot be reordered, so the fewer bulk bytes are there, the less an
//! urgent frame waits.

use std::collections::{HashMap, VecDeque};

use super::buf::TxBuf;
use super::frame::{self, FrameType, StreamId, FRAME_OVERHEAD};

/// DATA frames at most this large go to the urgent lane (when their stream
/// has nothing in the bulk lane): a round trip's request or reply.
pub const URGENT_DATA_MAX: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    Urgent,
    Bulk,
}

/// One frame in a lane: where it ends (in bytes appended to that lane so
/// far), its stream (bulk) and whether it counts as session frame bytes (a
/// HELLO does not).
#[derive(Clone, Copy, Debug)]
struct Record {
    end: u64,
    stream: StreamId,
    counted: bool,
}

#[derive(Debug, Default)]
struct LaneState {
    buf: TxBuf,
    records: VecDeque<Record>,
    /// Bytes appended and written, counted from the lane's start.
    appended: u64,
    written: u64,
    /// Where the last fully written frame ends.
    boundary: u64,
}

impl LaneState {
    fn push(&mut self, n: usize, stream: StreamId, counted: bool) -> &mut [u8] {
        self.appended += n as u64;
        self.records.push_back(Record {
            end: self.appended,
            stream,
            counted,
        });
        self.buf.append(n)
    }

    /// Pending bytes up to the end of the frame being written.
    fn rest_of_frame(&self) -> &[u8] {
        let end = self.records.front().map_or(self.appended, |r| r.end);
        &self.buf.pending()[..(end - self.written) as usize]
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.records.clear();
        self.appended = 0;
        self.written = 0;
        self.boundary = 0;
    }
}

#[derive(Debug, Default)]
pub struct TxQueue {
    urgent: LaneState,
    bulk: LaneState,
    /// Bytes each stream has in the bulk lane.
    bulk_by_stream: HashMap<StreamId, usize>,
    /// The lane the last [`TxQueue::poll`] handed out.
    last: Option<Lane>,
    /// Session frame bytes (not HELLOs) written so far.
    frames_written: u64,
}

impl TxQueue {
    /// Both lanes stop doubling their buffers at `soft_limit` bytes.
    pub fn with_soft_limit(soft_limit: usize) -> TxQueue {
        TxQueue {
            urgent: LaneState {
                buf: TxBuf::with_soft_limit(soft_limit),
                ..LaneState::default()
            },
            bulk: LaneState {
                buf: TxBuf::with_soft_limit(soft_limit),
                ..LaneState::default()
            },
            ..TxQueue::default()
        }
    }

    fn lane(&mut self, l: Lane) -> &mut LaneState {
        match l {
            Lane::Urgent => &mut self.urgent,
            Lane::Bulk => &mut self.bulk,
        }
    }

    /// Bytes waiting in both lanes.
    pub fn len(&self) -> usize {
        self.urgent.buf.len() + self.bulk.buf.len()
    }

    /// Bytes waiting in the bulk lane (what the high-water mark limits).
    pub fn bulk_len(&self) -> usize {
        self.bulk.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.urgent.buf.is_empty() && self.bulk.buf.is_empty()
    }

    /// Session frame bytes written so far (HELLOs not counted): what the
    /// peer's ACKs count too.
    pub fn frames_written(&self) -> u64 {
        self.frames_written
    }

    /// Forgets everything queued (the session ended).
    pub fn clear(&mut self) {
        self.urgent.clear();
        self.bulk.clear();
        self.bulk_by_stream.clear();
        self.last = None;
        self.frames_written = 0;
    }

    pub fn release(&mut self) {
        self.urgent.buf.release();
        self.bulk.buf.release();
        if self.bulk_by_stream.is_empty() {
            self.bulk_by_stream = HashMap::new();
        }
        if self.urgent.records.is_empty() {
            self.urgent.records = VecDeque::new();
        }
        if self.bulk.records.is_empty() {
            self.bulk.records = VecDeque::new();
        }
    }

    pub fn allocated(&self) -> usize {
        self.urgent.buf.allocated() + self.bulk.buf.allocated()
    }

    /// Room for a HELLO (not a session frame: not counted, never limited).
    pub fn append_hello(&mut self, n: usize) -> &mut [u8] {
        self.urgent.push(n, StreamId(0), false)
    }

    /// Room for raw bytes that are no frame of the session (tests inject
    /// garbage this way).
    #[cfg(test)]
    pub fn append_raw(&mut self, n: usize) -> &mut [u8] {
        self.urgent.push(n, StreamId(0), false)
    }

    /// A session starts: from now on frames count from zero, and what is
    /// still queued (HELLOs, frames of the session before) counts not at
    /// all, as the peer does not count it either.
    pub fn restart_count(&mut self) {
        self.frames_written = 0;
        for lane in [&mut self.urgent, &mut self.bulk] {
            for r in &mut lane.records {
                r.counted = false;
            }
        }
    }

    /// The session ended: its bulk frames are of no use to anyone and must
    /// not follow the next HELLO. A frame already begun is finished (the
    /// peer would otherwise read the next bytes as its rest).
    pub fn drop_bulk(&mut self) {
        let b = &mut self.bulk;
        let keep = if b.written > b.boundary {
            b.records.front().map_or(b.appended, |r| r.end)
        } else {
            b.written
        };
        b.buf.truncate_back((b.appended - keep) as usize);
        b.appended = keep;
        b.records.retain(|r| r.end <= keep);
        self.bulk_by_stream.clear();
        if let Some(r) = self.bulk.records.front() {
            // As `advance` counts it: the whole frame.
            let size = (r.end - self.bulk.boundary) as usize;
            self.bulk_by_stream.insert(r.stream, size);
        }
    }

    /// Whether [`TxQueue::poll`] with `allowed` would hand out anything.
    pub fn has_ready(&self, allowed: usize) -> bool {
        let first = self.bulk.records.front().map(|r| r.end - self.bulk.written);
        !self.urgent.buf.is_empty()
            || self.bulk.written > self.bulk.boundary
            || first.is_some_and(|f| f <= allowed as u64)
    }

    /// Room for a frame of type `ty` on `stream`, `n` bytes encoded, in the
    /// lane its stream's order allows.
    pub fn append_frame(&mut self, ty: FrameType, stream: StreamId, n: usize) -> &mut [u8] {
        let behind_bulk = stream.0 != 0 && self.bulk_by_stream.get(&stream).is_some_and(|&b| b > 0);
        // What concerns the other direction (CREDIT, ACCEPT, REFUSE) may go
        // ahead; what follows the stream's own DATA may not.
        let ordered = matches!(ty, FrameType::Data | FrameType::Fin | FrameType::Reset);
        if behind_bulk && ordered {
            *self.bulk_by_stream.entry(stream).or_default() += n;
            self.bulk.push(n, stream, true)
        } else {
            self.urgent.push(n, stream, true)
        }
    }

    /// Room for the payload of a DATA frame of up to `max` bytes, to be read
    /// into directly and committed with [`TxQueue::commit_data`].
    pub fn data_slot(&mut self, stream: StreamId, max: usize) -> &mut [u8] {
        self.bulk.buf.data_slot(stream, max)
    }

    /// Turns the first `n` bytes of the last slot into a DATA frame, in the
    /// urgent lane if it is small and its stream has nothing in bulk.
    pub fn commit_data(&mut self, stream: StreamId, n: usize, tag: u16) {
        let before = self.bulk.buf.len();
        self.bulk.buf.commit_data(stream, n, tag);
        let len = self.bulk.buf.len() - before;
        if len == 0 {
            return;
        }
        let in_bulk = self.bulk_by_stream.get(&stream).copied().unwrap_or(0);
        if n <= URGENT_DATA_MAX && in_bulk == 0 {
            let mut frame = [0u8; URGENT_DATA_MAX + FRAME_OVERHEAD];
            frame[..len].copy_from_slice(&self.bulk.buf.pending()[before..]);
            self.bulk.buf.truncate_back(len);
            self.urgent.push(len, stream, true).copy_from_slice(&frame[..len]);
        } else {
            self.bulk.appended += len as u64;
            let end = self.bulk.appended;
            self.bulk.records.push_back(Record {
                end,
                stream,
                counted: true,
            });
            *self.bulk_by_stream.entry(stream).or_default() += len;
        }
    }

    /// Bytes to write now: the rest of a frame already begun; else every
    /// urgent byte; else bulk frames, whole, as many as fit in `allowed`
    /// bytes.
    pub fn poll(&mut self, allowed: usize) -> &[u8] {
        for lane in [Lane::Urgent, Lane::Bulk] {
            let l = self.lane(lane);
            if l.written > l.boundary {
                self.last = Some(lane);
                return self.lane(lane).rest_of_frame();
            }
        }
        if !self.urgent.buf.is_empty() {
            self.last = Some(Lane::Urgent);
            return self.urgent.buf.pending();
        }
        self.last = Some(Lane::Bulk);
        if allowed == 0 {
            return &[];
        }
        let b = &self.bulk;
        if b.appended - b.written <= allowed as u64 {
            return b.buf.pending();
        }
        let mut n = 0u64;
        for r in &b.records {
            let size = r.end - b.written - n;
            if n + size > allowed as u64 {
                break;
            }
            n += size;
        }
        &b.buf.pending()[..n as usize]
    }

    /// `n` bytes of the last [`TxQueue::poll`] were written.
    pub fn advance(&mut self, n: usize) {
        let lane = self.last.expect("advance without poll");
        let mut counted = 0u64;
        let (l, mut by_stream) = match lane {
            Lane::Urgent => (&mut self.urgent, None),
            Lane::Bulk => (&mut self.bulk, Some(&mut self.bulk_by_stream)),
        };
        l.buf.advance(n);
        l.written += n as u64;
        while let Some(r) = l.records.front().copied() {
            if r.end > l.written {
                break;
            }
            l.records.pop_front();
            let size = (r.end - l.boundary) as usize;
            if r.counted {
                counted += size as u64;
            }
            if let Some(m) = by_stream.as_deref_mut() {
                if let Some(b) = m.get_mut(&r.stream) {
                    *b -= size;
                    if *b == 0 {
                        m.remove(&r.stream);
                    }
                }
            }
            l.boundary = r.end;
        }
        self.frames_written += counted;
    }
}

/// Appends `frame` to the lane its stream's order allows.
pub fn push_frame(tx: &mut TxQueue, tag: u16, frame: &frame::Frame<'_>) {
    let n = frame.encoded_len();
    frame.encode(tag, tx.append_frame(frame.frame_type(), frame.stream(), n));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::{decode, Decoded, Frame};

    fn data(tx: &mut TxQueue, stream: u64, len: usize) {
        let slot = tx.data_slot(StreamId(stream), len);
        slot[..len].fill(stream as u8);
        tx.commit_data(StreamId(stream), len, 7);
    }

    /// Frames in the order `poll` hands them out with `allowed` per poll.
    fn drain(tx: &mut TxQueue, allowed: usize) -> Vec<(FrameType, u64, usize)> {
        let mut wire = Vec::new();
        loop {
            let out = tx.poll(allowed).to_vec();
            if out.is_empty() {
                break;
            }
            // Write in odd pieces, as a socket would.
            let n = out.len().min(1000);
            wire.extend_from_slice(&out[..n]);
            tx.advance(n);
        }
        let mut frames = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            match decode(&wire[at..], 7, 1 << 20).unwrap() {
                Decoded::Frame(f, len) => {
                    frames.push((f.frame_type(), f.stream().0, len));
                    at += len;
                }
                other => panic!("{other:?}"),
            }
        }
        frames
    }

    #[test]
    fn small_frames_go_ahead_of_bulk_but_never_ahead_of_their_own_stream() {
        let mut tx = TxQueue::with_soft_limit(1 << 20);
        data(&mut tx, 1, 100_000); // bulk
        data(&mut tx, 2, 64); // urgent: stream 2 has no bulk
        data(&mut tx, 1, 64); // small, but behind stream 1's bulk
        push_frame(
            &mut tx,
            7,
            &Frame::Credit {
                stream: StreamId(1),
                increment: 9,
            },
        );
        push_frame(&mut tx, 7, &Frame::Fin { stream: StreamId(1) });
        push_frame(&mut tx, 7, &Frame::Ping { opaque: [1; 8] });
        let order = drain(&mut tx, usize::MAX);
        let kinds: Vec<(FrameType, u64)> = order.iter().map(|&(t, s, _)| (t, s)).collect();
        assert_eq!(
            kinds,
            vec![
                (FrameType::Data, 2),
                (FrameType::Credit, 1),
                (FrameType::Ping, 0),
                (FrameType::Data, 1),
                (FrameType::Data, 1),
                (FrameType::Fin, 1),
            ]
        );
        assert!(tx.is_empty());
        assert_eq!(tx.frames_written(), order.iter().map(|f| f.2 as u64).sum::<u64>());
    }

    #[test]
    fn a_frame_begun_is_finished_before_urgent_bytes_cut_in() {
        let mut tx = TxQueue::with_soft_limit(1 << 20);
        data(&mut tx, 1, 50_000);
        let first = tx.poll(usize::MAX).len();
        assert_eq!(first, 50_000 + FRAME_OVERHEAD);
        tx.advance(10_000);
        data(&mut tx, 2, 10);
        // The bulk frame is half out: its rest comes first, then the urgent.
        assert_eq!(tx.poll(usize::MAX).len(), 40_000 + FRAME_OVERHEAD);
        tx.advance(40_000 + FRAME_OVERHEAD);
        assert_eq!(tx.poll(usize::MAX).len(), 10 + FRAME_OVERHEAD);
    }

    #[test]
    fn bulk_is_handed_out_in_whole_frames_within_the_allowance() {
        let mut tx = TxQueue::with_soft_limit(1 << 20);
        for _ in 0..4 {
            data(&mut tx, 1, 10_000);
        }
        let f = 10_000 + FRAME_OVERHEAD;
        assert_eq!(tx.poll(25_000).len(), 2 * f);
        assert!(tx.poll(5).is_empty(), "no frame fits");
        assert!(!tx.has_ready(f - 1) && tx.has_ready(f));
        assert!(tx.poll(0).is_empty());
        // HELLOs are not session frame bytes.
        let mut h = TxQueue::with_soft_limit(1 << 20);
        h.append_hello(100).fill(0x89);
        let n = h.poll(usize::MAX).len();
        h.advance(n);
        assert_eq!(h.frames_written(), 0);
    }
}
