//! The session's two byte buffers: received bytes waiting to be parsed and
//! encoded frames waiting to be written. Both are flat `Vec`s with a moving
//! start, allocated once and compacted, so the hot path neither allocates nor
//! zeroes memory.

use super::frame::{self, FrameType, StreamId, FRAME_OVERHEAD, HEADER_LEN, TRAILER_LEN};

/// Received bytes not yet parsed.
#[derive(Debug, Default)]
pub struct RxBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// Compact before a read when less than this is free at the tail.
const MIN_READ: usize = 16 * 1024;

impl RxBuf {
    pub fn with_capacity(cap: usize) -> RxBuf {
        RxBuf {
            buf: vec![0; cap],
            start: 0,
            end: 0,
        }
    }

    pub fn filled(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// No room to read into, even after compaction.
    pub fn is_full(&self) -> bool {
        self.end - self.start == self.buf.len()
    }

    /// Free space to read into; empty only when the buffer is full.
    pub fn space(&mut self) -> &mut [u8] {
        let tail = self.buf.len() - self.end;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if tail < MIN_READ && self.start > 0 && (self.start >= self.buf.len() / 2 || tail == 0) {
            // Compact only once at least half the buffer was consumed, so
            // each byte is moved at most about once however input is cut.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were written at the start of [`RxBuf::space`].
    pub fn commit(&mut self, n: usize) {
        assert!(self.end + n <= self.buf.len(), "committed past the buffer");
        self.end += n;
    }

    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n;
    }

    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// A slice of bytes already consumed but not yet overwritten: how a DATA
    /// payload is handed out after its frame has been consumed.
    pub fn consumed_slice(&self, from: usize, len: usize) -> &[u8] {
        &self.buf[from..from + len]
    }

    /// Absolute offset of the first unparsed byte, for [`RxBuf::consumed_slice`].
    pub fn offset(&self) -> usize {
        self.start
    }
}

/// Encoded frames not yet written to the channel.
#[derive(Debug, Default)]
pub struct TxBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// A DATA slot handed out and not yet committed: (stream, payload room).
    slot: Option<(StreamId, usize)>,
}

impl TxBuf {
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn advance(&mut self, n: usize) {
        assert!(n <= self.len(), "advanced past the pending bytes");
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
        self.slot = None;
    }

    /// Makes sure `n` bytes are free after `end`.
    fn room(&mut self, n: usize) {
        if self.buf.len() - self.end >= n {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < n {
            let want = (self.end + n).max(self.buf.len() * 2).max(64 * 1024);
            self.buf.resize(want, 0);
        }
    }

    /// Appends `n` bytes and returns them to be filled in.
    pub fn append(&mut self, n: usize) -> &mut [u8] {
        self.slot = None;
        self.room(n);
        let at = self.end;
        self.end += n;
        &mut self.buf[at..at + n]
    }

    /// Room for the payload of a DATA frame of up to `max` bytes, to be read
    /// into directly and then committed with [`TxBuf::commit_data`].
    pub fn data_slot(&mut self, stream: StreamId, max: usize) -> &mut [u8] {
        self.room(FRAME_OVERHEAD + max);
        self.slot = Some((stream, max));
        let at = self.end + HEADER_LEN;
        &mut self.buf[at..at + max]
    }

    /// Turns the first `n` bytes of the last slot into a DATA frame.
    pub fn commit_data(&mut self, stream: StreamId, n: usize, tag: u16) {
        let (slot_stream, max) = self.slot.take().expect("commit_data without a data_slot");
        assert!(
            slot_stream == stream && n <= max,
            "commit does not match the slot"
        );
        if n == 0 {
            return;
        }
        let frame = &mut self.buf[self.end..self.end + FRAME_OVERHEAD + n];
        frame::write_header(frame, FrameType::Data, tag, n, stream);
        frame::write_trailer(frame, tag);
        self.end += HEADER_LEN + n + TRAILER_LEN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rx_compacts_a_partial_frame() {
        let mut rx = RxBuf::with_capacity(MIN_READ * 2);
        let n = rx.space().len();
        rx.space()[..n].fill(7);
        rx.commit(n);
        rx.consume(n - 3);
        assert_eq!(rx.space().len(), MIN_READ * 2 - 3);
        assert_eq!(rx.filled(), &[7, 7, 7]);
    }

    #[test]
    fn tx_data_slot_round_trip() {
        let mut tx = TxBuf::default();
        let slot = tx.data_slot(StreamId(3), 10);
        slot[..4].copy_from_slice(b"abcd");
        tx.commit_data(StreamId(3), 4, 0x1111);
        assert_eq!(tx.len(), FRAME_OVERHEAD + 4);
        let f = frame::decode(tx.pending(), 0x1111, 100).unwrap();
        assert_eq!(
            f,
            frame::Decoded::Frame(
                frame::Frame::Data {
                    stream: StreamId(3),
                    payload: b"abcd"
                },
                FRAME_OVERHEAD + 4
            )
        );
        tx.advance(tx.len());
        assert!(tx.is_empty());
    }

    #[test]
    fn empty_commit_adds_nothing() {
        let mut tx = TxBuf::default();
        tx.data_slot(StreamId(1), 10);
        tx.commit_data(StreamId(1), 0, 0);
        assert!(tx.is_empty());
    }
}
