//! Frame limits enforced on the bytes as they arrive, before any frame is buffered.
//!
//! actix-http's WebSocket parser checks a frame's size only once the whole frame is in its
//! buffer: a header announcing 2^62 bytes makes it keep reading (and growing the buffer) until
//! the heartbeat evicts the connection. [`FrameGuard`] sits between the socket and that parser
//! and reads every frame header as it streams past: a data frame announcing more than the limit,
//! or a fragmented message whose fragments add up to more, ends the input at that header
//! (everything before it is passed on). The session then closes with 1009 and a reason
//! ([`GuardState::violation`]). It also tells the session when bytes last arrived and since when a
//! message has been in progress, so a slow sender of a large frame is bounded in time.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

use actix_web::error::PayloadError;
use bytes::Bytes;
use futures_util::Stream;

/// Why the guard ended the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A data frame's header announced this many payload bytes.
    FrameTooLarge { announced: u64 },
    /// The fragments of one message added up to this many bytes.
    MessageTooLarge { total: u64 },
}

impl Violation {
    pub fn describe(&self, max: usize) -> String {
        match self {
            Violation::FrameTooLarge { announced } => {
                format!("frame header announces {announced} bytes; the limit is {max}")
            }
            Violation::MessageTooLarge { total } => {
                format!("fragmented message reached {total} bytes; the limit is {max}")
            }
        }
    }
}

/// What the guard tells the session.
#[derive(Debug)]
pub struct GuardState {
    violation: Cell<Option<Violation>>,
    last_bytes: Cell<Instant>,
    message_since: Cell<Option<Instant>>,
}

impl GuardState {
    pub fn new() -> Rc<GuardState> {
        Rc::new(GuardState {
            violation: Cell::new(None),
            last_bytes: Cell::new(Instant::now()),
            message_since: Cell::new(None),
        })
    }

    pub fn violation(&self) -> Option<Violation> {
        self.violation.get()
    }

    /// When the last bytes of any kind arrived.
    pub fn last_bytes(&self) -> Instant {
        self.last_bytes.get()
    }

    /// Since when a data message (a frame, or a fragmented message) has been arriving without
    /// being complete.
    pub fn message_since(&self) -> Option<Instant> {
        self.message_since.get()
    }
}

/// Incremental reader of client frame headers (RFC 6455 §5.2).
#[derive(Debug)]
struct HeaderReader {
    max: u64,
    header: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    payload_left: u64,
    /// The current frame's payload completes a data message.
    completes_message: bool,
    /// A fragmented message is open (its first frame had FIN clear).
    fragmented: bool,
    message_total: u64,
}

/// What one chunk held.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    Ok {
        message_open: bool,
    },
    /// The header starting at this offset of the chunk breaks the limit.
    Stop {
        at: usize,
        why: Violation,
    },
}

impl HeaderReader {
    fn new(max: usize) -> Self {
        HeaderReader {
            max: max as u64,
            header: [0; 14],
            have: 0,
            payload_left: 0,
            completes_message: false,
            fragmented: false,
            message_total: 0,
        }
    }

    fn header_len(&self) -> usize {
        let ext = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        2 + ext + mask
    }

    fn announced(&self) -> u64 {
        match self.header[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.header[2..10]);
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        }
    }

    fn scan(&mut self, chunk: &[u8]) -> Scan {
        let mut i = 0;
        let mut header_start = 0usize;
        while i < chunk.len() {
            if self.payload_left > 0 {
                let n = self.payload_left.min((chunk.len() - i) as u64);
                self.payload_left -= n;
                i += n as usize;
                if self.payload_left == 0 && self.completes_message {
                    self.completes_message = false;
                }
                continue;
            }
            if self.have == 0 {
                header_start = i;
            }
            self.header[self.have] = chunk[i];
            self.have += 1;
            i += 1;
            if self.have < 2 || self.have < self.header_len() {
                continue;
            }
            // A whole header.
            let fin = self.header[0] & 0x80 != 0;
            let opcode = self.header[0] & 0x0f;
            let len = self.announced();
            self.have = 0;
            let at = header_start;
            match opcode {
                // Text or binary: a new message.
                0x1 | 0x2 => {
                    if len > self.max {
                        return Scan::Stop {
                            at,
                            why: Violation::FrameTooLarge { announced: len },
                        };
                    }
                    self.fragmented = !fin;
                    self.message_total = len;
                    self.completes_message = fin;
                }
                // Continuation: adds to the open message.
                0x0 => {
                    let total = self.message_total.saturating_add(len);
                    if len > self.max {
                        return Scan::Stop {
                            at,
                            why: Violation::FrameTooLarge { announced: len },
                        };
                    }
                    if total > self.max {
                        return Scan::Stop {
                            at,
                            why: Violation::MessageTooLarge { total },
                        };
                    }
                    self.message_total = total;
                    if fin {
                        self.fragmented = false;
                        self.completes_message = true;
                    }
                }
                // Control frames (the parser limits them to 125 bytes) and anything the parser
                // refuses itself.
                _ => {}
            }
            self.payload_left = len;
            if len == 0 {
                self.completes_message = false;
            }
        }
        let mid_frame = self.have > 0 || self.payload_left > 0;
        Scan::Ok {
            message_open: self.fragmented || (mid_frame && self.completes_message),
        }
    }
}

/// Wraps the request payload of a WebSocket session (see the module docs).
pub struct FrameGuard<S> {
    inner: S,
    reader: HeaderReader,
    state: Rc<GuardState>,
    /// The rest of a chunk, from the offending header on, was dropped: end after the error.
    stopped: bool,
    /// The error to give on the next poll (after passing the bytes before the header).
    pending: bool,
}

impl<S> FrameGuard<S> {
    pub fn new(inner: S, max_frame_bytes: usize, state: Rc<GuardState>) -> Self {
        FrameGuard {
            inner,
            reader: HeaderReader::new(max_frame_bytes),
            state,
            stopped: false,
            pending: false,
        }
    }
}

impl<S> Stream for FrameGuard<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.pending {
            this.pending = false;
            return Poll::Ready(Some(Err(PayloadError::Overflow)));
        }
        if this.stopped {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                let now = Instant::now();
                this.state.last_bytes.set(now);
                match this.reader.scan(&chunk) {
                    Scan::Ok { message_open } => {
                        if !message_open {
                            this.state.message_since.set(None);
                        } else if this.state.message_since.get().is_none() {
                            this.state.message_since.set(Some(now));
                        }
                        Poll::Ready(Some(Ok(chunk)))
                    }
                    Scan::Stop { at, why } => {
                        this.state.violation.set(Some(why));
                        this.stopped = true;
                        if at > 0 {
                            this.pending = true;
                            Poll::Ready(Some(Ok(chunk.slice(..at))))
                        } else {
                            Poll::Ready(Some(Err(PayloadError::Overflow)))
                        }
                    }
                }
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame header (mask key zero) for `len` payload bytes.
    fn header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
        let mut h = vec![if fin { 0x80 } else { 0 } | opcode];
        if len < 126 {
            h.push(0x80 | len as u8);
        } else if len <= u64::from(u16::MAX) {
            h.push(0x80 | 126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            h.push(0x80 | 127);
            h.extend_from_slice(&len.to_be_bytes());
        }
        h.extend_from_slice(&[0, 0, 0, 0]);
        h
    }

    fn frame(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        let mut f = header(fin, opcode, len as u64);
        f.extend(std::iter::repeat_n(b'x', len));
        f
    }

    #[test]
    fn frames_within_the_limit_pass_byte_by_byte() {
        let mut r = HeaderReader::new(1000);
        let mut all = frame(true, 0x1, 1000);
        all.extend(frame(true, 0x9, 0));
        all.extend(frame(false, 0x1, 400));
        all.extend(frame(true, 0x0, 600));
        for b in &all {
            assert!(matches!(r.scan(std::slice::from_ref(b)), Scan::Ok { .. }));
        }
        assert_eq!(
            r.scan(&[]),
            Scan::Ok {
                message_open: false
            }
        );
    }

    #[test]
    fn an_announced_length_over_the_limit_stops_at_its_header() {
        let mut r = HeaderReader::new(1000);
        let mut chunk = frame(true, 0x1, 10);
        let at = chunk.len();
        chunk.extend(header(true, 0x1, 1 << 62));
        assert_eq!(
            r.scan(&chunk),
            Scan::Stop {
                at,
                why: Violation::FrameTooLarge { announced: 1 << 62 }
            }
        );
        // Also when the header arrives split across chunks.
        let mut r = HeaderReader::new(1000);
        let h = header(true, 0x2, 1001);
        assert!(matches!(r.scan(&h[..3]), Scan::Ok { .. }));
        assert_eq!(
            r.scan(&h[3..]),
            Scan::Stop {
                at: 0,
                why: Violation::FrameTooLarge { announced: 1001 }
            }
        );
    }

    #[test]
    fn fragments_are_limited_by_their_sum() {
        let mut r = HeaderReader::new(1000);
        let mut chunk = frame(false, 0x1, 600);
        assert_eq!(r.scan(&chunk), Scan::Ok { message_open: true });
        // A ping between fragments is allowed and does not count.
        chunk = frame(true, 0x9, 4);
        assert_eq!(r.scan(&chunk), Scan::Ok { message_open: true });
        chunk = frame(false, 0x0, 300);
        assert_eq!(r.scan(&chunk), Scan::Ok { message_open: true });
        assert_eq!(
            r.scan(&header(true, 0x0, 101)),
            Scan::Stop {
                at: 0,
                why: Violation::MessageTooLarge { total: 1001 }
            }
        );
    }

    #[test]
    fn a_frame_in_progress_is_an_open_message() {
        let mut r = HeaderReader::new(1000);
        let f = frame(true, 0x1, 500);
        assert_eq!(r.scan(&f[..100]), Scan::Ok { message_open: true });
        assert_eq!(
            r.scan(&f[100..]),
            Scan::Ok {
                message_open: false
            }
        );
    }
}
