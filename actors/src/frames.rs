//! The agent's WebSocket codec with the frame limit applied at the header.
//!
//! actix-http's parser checks a frame's size only once the whole frame has been buffered, so a
//! gateway (or anything posing as one on the way) announcing a huge frame would make the agent
//! read and buffer it. [`GuardedCodec`] reads the header of the next frame first: a data frame
//! announcing more than the limit, or a continuation that takes a fragmented message past it,
//! is refused there with `Overflow`, before its payload is read.

use actix_codec::{Decoder, Encoder};
use awc::ws::{Codec, Frame, Message};
use bytes::BytesMut;

pub use actix_http::ws::{Item, ProtocolError};

#[derive(Debug)]
pub struct GuardedCodec {
    inner: Codec,
    max: u64,
    /// Bytes of the fragmented message being received (0: none open).
    message_total: u64,
}

impl GuardedCodec {
    /// Wraps the client codec `awc` negotiated; `max` is the largest message accepted.
    pub fn new(inner: Codec, max: usize) -> Self {
        GuardedCodec {
            inner,
            max: max as u64,
            message_total: 0,
        }
    }
}

/// The opcode and announced payload length of the frame at the start of `src`, once enough
/// of its header is there.
fn peek_header(src: &[u8]) -> Option<(u8, u64)> {
    let (&b0, &b1) = (src.first()?, src.get(1)?);
    let len = match b1 & 0x7f {
        126 => u64::from(u16::from_be_bytes([*src.get(2)?, *src.get(3)?])),
        127 => {
            let b: [u8; 8] = src.get(2..10)?.try_into().ok()?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    Some((b0 & 0x0f, len))
}

impl Decoder for GuardedCodec {
    type Item = Frame;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        if let Some((opcode, len)) = peek_header(src) {
            let too_large = match opcode {
                0x1 | 0x2 => len > self.max,
                0x0 => self.message_total.saturating_add(len) > self.max,
                _ => false,
            };
            if too_large {
                return Err(ProtocolError::Overflow);
            }
        }
        let frame = self.inner.decode(src)?;
        if let Some(Frame::Continuation(item)) = &frame {
            match item {
                Item::FirstText(b) | Item::FirstBinary(b) => self.message_total = b.len() as u64,
                Item::Continue(b) => self.message_total += b.len() as u64,
                Item::Last(_) => self.message_total = 0,
            }
        }
        Ok(frame)
    }
}

impl Encoder<Message> for GuardedCodec {
    type Error = ProtocolError;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        self.inner.encode(msg, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(fin: bool, opcode: u8, len: u64, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        if len < 126 {
            f.push(len as u8);
        } else if len <= u64::from(u16::MAX) {
            f.push(126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(127);
            f.extend_from_slice(&len.to_be_bytes());
        }
        f.extend_from_slice(payload);
        f
    }

    fn codec() -> GuardedCodec {
        GuardedCodec::new(Codec::new().client_mode().max_size(1000), 1000)
    }

    #[test]
    fn a_huge_announced_frame_is_refused_at_its_header() {
        let mut c = codec();
        let mut buf = BytesMut::from(&server_frame(true, 0x1, 1 << 62, b"")[..]);
        assert!(matches!(c.decode(&mut buf), Err(ProtocolError::Overflow)));
        // Only the first bytes of the header: nothing to say yet.
        let mut c = codec();
        let mut buf = BytesMut::from(&server_frame(true, 0x1, 1 << 62, b"")[..5]);
        assert!(matches!(c.decode(&mut buf), Ok(None)));
    }

    #[test]
    fn fragments_are_reassembled_within_the_limit_and_refused_past_it() {
        let mut c = codec();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&server_frame(false, 0x1, 600, &[b'a'; 600]));
        buf.extend_from_slice(&server_frame(true, 0x0, 400, &[b'b'; 400]));
        assert!(matches!(
            c.decode(&mut buf),
            Ok(Some(Frame::Continuation(Item::FirstText(_))))
        ));
        assert!(matches!(
            c.decode(&mut buf),
            Ok(Some(Frame::Continuation(Item::Last(_))))
        ));
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&server_frame(false, 0x1, 600, &[b'a'; 600]));
        buf.extend_from_slice(&server_frame(true, 0x0, 401, &[b'b'; 401]));
        assert!(c.decode(&mut buf).expect("first").is_some());
        assert!(matches!(c.decode(&mut buf), Err(ProtocolError::Overflow)));
    }
}
