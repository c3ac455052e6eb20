//! The session's two byte buffers: received bytes waiting to be parsed and
//! encoded frames waiting to be written. Both are flat `Vec`s with a moving
//! start, compacted in place, so the hot path neither allocates nor zeroes
//! memory. Both are allocated only when bytes flow and can be given back when
//! empty ([`RxBuf::release`], [`TxBuf::release`]): an idle channel holds no
//! buffer. Their size is set by this side's configuration, never by what the
//! peer declares.

use super::frame::{self, FrameType, StreamId, FRAME_OVERHEAD, HEADER_LEN, TRAILER_LEN};

/// Received bytes not yet parsed.
///
/// It starts small and doubles, up to its capacity, whenever a read fills
/// all the room it was given (the peer has more to send); after a burst it
/// shrinks back to what recent reads needed. Idle channels so hold a few KiB,
/// busy ones read in large pieces.
#[derive(Debug, Default)]
pub struct RxBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Most the buffer grows to.
    cap: usize,
    /// The last read filled the room it had: grow before the next.
    grow: bool,
    /// Most bytes held since the last trim, and emptyings since then.
    peak: usize,
    emptied: u32,
}

/// Compact before a read when less than this is free at the tail.
const MIN_READ: usize = 16 * 1024;
/// What the receive buffer starts with and shrinks back to.
const RX_FIRST: usize = 4 * 1024;
/// Emptyings between two looks at whether a buffer is oversized.
const TRIM_EVERY: u32 = 16;

impl RxBuf {
    /// A buffer that grows to `cap` bytes; nothing is allocated before the
    /// first read.
    pub fn with_capacity(cap: usize) -> RxBuf {
        RxBuf {
            cap,
            ..RxBuf::default()
        }
    }

    /// Gives the memory back if nothing is buffered; the next read
    /// allocates it again.
    pub fn release(&mut self) {
        if self.is_empty() {
            self.clear();
            self.buf = Vec::new();
            self.grow = false;
            self.peak = 0;
            self.emptied = 0;
        }
    }

    /// Bytes of memory held.
    pub fn allocated(&self) -> usize {
        self.buf.capacity()
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

    /// No room to read into: the buffer holds `cap` bytes, or it is at
    /// `cap` with its tail used up and less than [`RxBuf::min_gap`] consumed
    /// before the bytes it holds. In the second case it waits for more to be
    /// consumed rather than move almost all of it to free a few bytes (a
    /// consumer throttled to small batches would otherwise move the whole
    /// buffer per batch). A consumer whose largest unit is at most
    /// `cap - cap / 4` bytes can always take one from a full buffer.
    pub fn is_full(&self) -> bool {
        self.len() >= self.cap
            || (self.buf.len() == self.cap && self.end == self.cap && self.start < self.min_gap())
    }

    /// Consumed bytes that make compacting a full buffer worth it.
    fn min_gap(&self) -> usize {
        MIN_READ.min(self.cap / 4).max(1)
    }

    /// Free space to read into; empty only when [`RxBuf::is_full`].
    pub fn space(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            self.emptied += 1;
            if self.emptied >= TRIM_EVERY {
                self.trim();
            }
        }
        if self.is_full() {
            return &mut [];
        }
        let tail = self.buf.len() - self.end;
        let at_cap = self.buf.len() == self.cap;
        if tail < MIN_READ && self.start > 0 && (self.start >= self.buf.len() / 2 || (tail == 0 && at_cap)) {
            // Compact once at least half the buffer was consumed, so each
            // byte is moved at most about once however input is cut; or, at
            // the cap with no tail left, once at least the minimum gap was.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let tail = self.buf.len() - self.end;
        if (self.grow || tail == 0) && self.buf.len() < self.cap {
            let want = (self.buf.len() * 2).max(RX_FIRST).min(self.cap);
            self.buf.reserve_exact(want - self.buf.len());
            self.buf.resize(want, 0);
        }
        self.grow = false;
        &mut self.buf[self.end..]
    }

    /// `n` bytes were written at the start of [`RxBuf::space`].
    pub fn commit(&mut self, n: usize) {
        assert!(self.end + n <= self.buf.len(), "committed past the buffer");
        self.grow = n > 0 && self.end + n == self.buf.len();
        self.end += n;
        self.peak = self.peak.max(self.end);
    }

    /// After a burst: if the last [`TRIM_EVERY`] emptyings never needed half
    /// of the buffer, shrink it to what they needed.
    fn trim(&mut self) {
        let keep = self.peak.max(RX_FIRST);
        if self.buf.len() > 2 * keep {
            self.buf.truncate(keep);
            self.buf.shrink_to_fit();
        }
        self.peak = 0;
        self.emptied = 0;
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
    /// Growth stops doubling here (the most the session queues by its own
    /// rules); past it the buffer grows only by what is needed.
    soft_limit: usize,
    /// Most bytes pending since the last trim, and emptyings since then.
    peak: usize,
    emptied: u32,
}

/// What the transmit buffer starts with and shrinks back to.
const TX_FIRST: usize = 4 * 1024;

impl TxBuf {
    /// An empty buffer whose doubling stops at `soft_limit` bytes.
    pub fn with_soft_limit(soft_limit: usize) -> TxBuf {
        TxBuf {
            soft_limit,
            ..TxBuf::default()
        }
    }

    /// Gives the memory back if nothing is pending.
    pub fn release(&mut self) {
        if self.is_empty() && self.slot.is_none() {
            self.buf = Vec::new();
            self.peak = 0;
            self.emptied = 0;
        }
    }

    /// Bytes of memory held.
    pub fn allocated(&self) -> usize {
        self.buf.capacity()
    }

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
            self.emptied += 1;
            if self.emptied >= TRIM_EVERY {
                self.trim();
            }
        }
    }

    /// As [`RxBuf`]'s trim.
    fn trim(&mut self) {
        let keep = self.peak.max(TX_FIRST);
        if self.buf.len() > 2 * keep {
            self.buf.truncate(keep);
            self.buf.shrink_to_fit();
        }
        self.peak = 0;
        self.emptied = 0;
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
            let doubled = (self.buf.len() * 2).max(TX_FIRST);
            let want = (self.end + n).max(doubled.min(self.soft_limit.max(TX_FIRST)));
            self.buf.reserve_exact(want - self.buf.len());
            self.buf.resize(want, 0);
        }
        self.peak = self.peak.max(self.end + n);
    }

    /// Takes back the last `n` bytes appended (they moved elsewhere, or
    /// are no longer wanted).
    pub fn truncate_back(&mut self, n: usize) {
        assert!(n <= self.len(), "truncated past the pending bytes");
        self.end -= n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
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

    /// Fills the whole space offered, as a read from a busy peer would.
    fn fill_all(rx: &mut RxBuf) -> usize {
        let space = rx.space();
        let n = space.len();
        space.fill(7);
        rx.commit(n);
        n
    }

    #[test]
    fn rx_compacts_a_partial_frame() {
        let mut rx = RxBuf::with_capacity(MIN_READ * 2);
        while rx.allocated() < MIN_READ * 2 {
            fill_all(&mut rx);
        }
        let n = rx.len();
        rx.consume(n - 3);
        assert_eq!(rx.space().len(), MIN_READ * 2 - 3);
        assert_eq!(rx.filled(), &[7, 7, 7]);
    }

    #[test]
    fn a_full_buffer_consumed_in_crumbs_is_not_moved_for_each() {
        let cap = 256 * 1024;
        let mut rx = RxBuf::with_capacity(cap);
        while fill_all(&mut rx) > 0 {}
        assert_eq!(rx.len(), cap);
        // A throttled consumer takes a few hundred bytes at a time: no read
        // (and no compaction) until a minimum gap was consumed.
        let mut taken = 0;
        while taken + 560 < MIN_READ {
            rx.consume(560);
            taken += 560;
            assert!(rx.is_full());
            assert!(rx.space().is_empty(), "moved {} bytes to free {taken}", rx.len());
        }
        rx.consume(560);
        assert!(!rx.is_full());
        assert_eq!(rx.space().len(), taken + 560);
        // The largest unit a consumer may rely on still fits.
        assert!(rx.len() >= cap - cap / 4);
    }

    #[test]
    fn rx_grows_while_reads_fill_it_and_shrinks_after() {
        let cap = 512 * 1024;
        let mut rx = RxBuf::with_capacity(cap);
        assert_eq!(rx.space().len(), RX_FIRST, "starts small");
        // A busy peer: every read fills the room; the buffer doubles.
        let mut sizes = vec![];
        for _ in 0..10 {
            sizes.push(fill_all(&mut rx));
            let n = rx.len();
            rx.consume(n);
        }
        assert_eq!(&sizes[..4], &[RX_FIRST, 2 * RX_FIRST, 4 * RX_FIRST, 8 * RX_FIRST]);
        assert_eq!(*sizes.last().unwrap(), cap);
        // Small reads for a while: back to a few KiB.
        for _ in 0..2 * TRIM_EVERY {
            rx.space()[..30].fill(1);
            rx.commit(30);
            rx.consume(30);
        }
        rx.space();
        assert_eq!(rx.allocated(), RX_FIRST);
        assert!(!rx.is_full());
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
    fn buffers_are_allocated_on_demand_and_given_back() {
        let mut rx = RxBuf::with_capacity(MIN_READ * 4);
        assert_eq!(rx.allocated(), 0);
        assert_eq!(rx.space().len(), RX_FIRST);
        rx.commit(10);
        rx.release();
        assert_eq!(rx.allocated(), RX_FIRST, "bytes are still buffered");
        rx.consume(10);
        rx.release();
        assert_eq!(rx.allocated(), 0);

        let mut tx = TxBuf::with_soft_limit(1 << 20);
        tx.append(100);
        assert_eq!(tx.allocated(), TX_FIRST);
        tx.advance(100);
        tx.release();
        assert_eq!(tx.allocated(), 0);
    }

    #[test]
    fn tx_growth_stops_doubling_at_its_limit_and_shrinks_after_a_burst() {
        let limit = 300 * 1024;
        let mut tx = TxBuf::with_soft_limit(limit);
        for _ in 0..5 {
            tx.append(100 * 1024);
        }
        // 500 KiB needed: doubled up to the limit, then grown only as needed.
        assert_eq!(tx.allocated(), 500 * 1024);
        tx.advance(tx.len());
        // Small traffic for a while (two trim windows: the first still saw
        // the burst): the buffer goes back to a few KiB.
        for _ in 0..2 * TRIM_EVERY {
            tx.append(100);
            tx.advance(100);
        }
        assert_eq!(tx.allocated(), TX_FIRST);
        // Steady bulk keeps its buffer.
        for _ in 0..3 * TRIM_EVERY {
            tx.append(200 * 1024);
            tx.advance(200 * 1024);
        }
        assert_eq!(tx.allocated(), 200 * 1024);
    }

    #[test]
    fn empty_commit_adds_nothing() {
        let mut tx = TxBuf::default();
        tx.data_slot(StreamId(1), 10);
        tx.commit_data(StreamId(1), 0, 0);
        assert!(tx.is_empty());
    }
}
