//! The output buffer: bytes waiting to be written to the channel, and which
//! of them end frames, so that the report counts frames actually written.

use std::collections::VecDeque;

use vios_common::proto::frame::Frame;

/// A run of `n` frames of `len` bytes each, starting at absolute offset `start`.
struct Mark {
    start: u64,
    len: u64,
    n: u64,
}

#[derive(Default)]
pub struct Out {
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    pos: usize,
    /// Absolute offset (bytes queued since the start) of `buf[0]`.
    base: u64,
    marks: VecDeque<Mark>,
    /// Frames completely written.
    pub frames_sent: u64,
    /// Frames dropped unsent (or cut) when a session ended under them.
    pub frames_dropped: u64,
    pub bytes_dropped: u64,
}

impl Out {
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn unsent(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// `n` bytes of [`Out::unsent`] were written.
    pub fn advance(&mut self, n: usize) {
        self.pos += n;
        self.settle();
        if self.pos == self.buf.len() {
            self.base += self.buf.len() as u64;
            self.buf.clear();
            self.pos = 0;
        }
    }

    fn settle(&mut self) {
        let written = self.base + self.pos as u64;
        while let Some(m) = self.marks.front_mut() {
            let done = if written > m.start {
                ((written - m.start) / m.len).min(m.n)
            } else {
                0
            };
            self.frames_sent += done;
            if done == m.n {
                self.marks.pop_front();
            } else {
                m.start += done * m.len;
                m.n -= done;
                break;
            }
        }
    }

    /// Moves the unsent bytes to the front so the buffer does not grow.
    pub fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.base += self.pos as u64;
            self.pos = 0;
        }
    }

    /// Forgets everything not written yet (the session it was for is over).
    pub fn drop_pending(&mut self) {
        self.settle();
        self.frames_dropped += self.marks.iter().map(|m| m.n).sum::<u64>();
        self.marks.clear();
        self.bytes_dropped += self.pending() as u64;
        self.buf.truncate(self.pos);
    }

    fn mark(&mut self, start: u64, len: u64, n: u64) {
        if let Some(last) = self.marks.back_mut() {
            if last.len == len && last.start + last.len * last.n == start {
                last.n += n;
                return;
            }
        }
        self.marks.push_back(Mark { start, len, n });
    }

    /// Appends one encoded frame.
    pub fn frame(&mut self, tag: u16, f: &Frame<'_>) {
        let start = self.buf.len();
        let len = f.encoded_len();
        self.buf.resize(start + len, 0);
        f.encode(tag, &mut self.buf[start..]);
        self.mark(self.base + start as u64, len as u64, 1);
    }

    /// Appends `n` frames of `len` bytes each, already encoded in `bytes`.
    pub fn frames(&mut self, bytes: &[u8], len: usize, n: u64) {
        debug_assert_eq!(bytes.len() as u64, len as u64 * n);
        let start = self.base + self.buf.len() as u64;
        self.buf.extend_from_slice(bytes);
        if n > 0 {
            self.mark(start, len as u64, n);
        }
    }

    /// Appends bytes that are not frames (HELLOs, garbage).
    pub fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Room for `n` more bytes that are not frames, to fill in place.
    pub fn raw_space(&mut self, n: usize) -> &mut [u8] {
        let start = self.buf.len();
        self.buf.resize(start + n, 0);
        &mut self.buf[start..]
    }
}
