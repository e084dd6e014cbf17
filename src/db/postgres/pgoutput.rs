//! A reader of PostgreSQL's built-in `pgoutput` logical decoding format (protocol version 1,
//! "Logical Replication Message Formats" in the PostgreSQL manual), as returned row by row by
//! `pg_logical_slot_peek_binary_changes`. Only what Tether's logical capture needs: transaction
//! bounds, relations, row changes, truncates and logical messages. Pure: no database here.

/// One column of a relation, as the `R` message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
}

/// One column's value in a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    Null,
    /// An unchanged TOASTed value the server did not send again.
    Unchanged,
    /// The value in the type's text output form.
    Text(String),
}

pub type Tuple = Vec<Cell>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        /// The commit record's LSN.
        final_lsn: u64,
        /// Commit time, microseconds since 2000-01-01 00:00:00 UTC.
        commit_us: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: u64,
        end_lsn: u64,
        commit_us: i64,
    },
    Relation {
        oid: u32,
        namespace: String,
        name: String,
        columns: Vec<Column>,
    },
    Insert {
        rel: u32,
        new: Tuple,
    },
    Update {
        rel: u32,
        /// The old row: the whole row with `REPLICA IDENTITY FULL`, the key columns when the
        /// key changed with the default identity, absent otherwise.
        old: Option<Tuple>,
        new: Tuple,
    },
    Delete {
        rel: u32,
        old: Tuple,
    },
    Truncate {
        rels: Vec<u32>,
    },
    /// A logical message (`pg_logical_emit_message`).
    Logical {
        transactional: bool,
        prefix: String,
    },
    /// Origin, type and anything else this reader does not act on.
    Other(u8),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("pgoutput message `{kind}`: {what}")]
pub struct DecodeError {
    pub kind: char,
    pub what: String,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    kind: char,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: impl Into<String>) -> DecodeError {
        DecodeError {
            kind: self.kind,
            what: what.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| self.err(format!("truncated at byte {} reading {what}", self.pos)))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn i16(&mut self, what: &str) -> Result<i16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        Ok(self.u32(what)? as i32)
    }

    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        Ok(self.u64(what)? as i64)
    }

    fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let len = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| self.err(format!("{what} is not terminated")))?;
        let s = std::str::from_utf8(&rest[..len])
            .map_err(|_| self.err(format!("{what} is not UTF-8")))?
            .to_string();
        self.pos += len + 1;
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.i16("column count")?;
        if n < 0 {
            return Err(self.err("negative column count"));
        }
        let mut t = Vec::with_capacity(n as usize);
        for i in 0..n {
            let cell = match self.u8("column kind")? {
                b'n' => Cell::Null,
                b'u' => Cell::Unchanged,
                b't' => {
                    let len = self.i32("value length")?;
                    let len = usize::try_from(len)
                        .map_err(|_| self.err(format!("column {i}: negative length")))?;
                    let bytes = self.take(len, "value")?;
                    Cell::Text(
                        std::str::from_utf8(bytes)
                            .map_err(|_| self.err(format!("column {i}: value is not UTF-8")))?
                            .to_string(),
                    )
                }
                b'b' => return Err(self.err(format!("column {i}: binary values not requested"))),
                other => {
                    return Err(self.err(format!("column {i}: unknown kind `{}`", other as char)))
                }
            };
            t.push(cell);
        }
        Ok(t)
    }
}

/// Decodes one message.
pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    let Some(&first) = buf.first() else {
        return Err(DecodeError {
            kind: '?',
            what: "empty message".into(),
        });
    };
    let mut c = Cursor {
        buf,
        pos: 1,
        kind: first as char,
    };
    Ok(match first {
        b'B' => Message::Begin {
            final_lsn: c.u64("final LSN")?,
            commit_us: c.i64("commit time")?,
            xid: c.u32("xid")?,
        },
        b'C' => {
            c.u8("flags")?;
            Message::Commit {
                commit_lsn: c.u64("commit LSN")?,
                end_lsn: c.u64("end LSN")?,
                commit_us: c.i64("commit time")?,
            }
        }
        b'R' => {
            let oid = c.u32("relation oid")?;
            let namespace = c.string("namespace")?;
            let name = c.string("relation name")?;
            c.u8("replica identity")?;
            let n = c.i16("column count")?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n.max(0) {
                c.u8("column flags")?;
                let name = c.string("column name")?;
                let type_oid = c.u32("column type")?;
                c.i32("type modifier")?;
                columns.push(Column { name, type_oid });
            }
            Message::Relation {
                oid,
                namespace: if namespace.is_empty() {
                    "pg_catalog".into()
                } else {
                    namespace
                },
                name,
                columns,
            }
        }
        b'I' => {
            let rel = c.u32("relation oid")?;
            match c.u8("tuple marker")? {
                b'N' => Message::Insert {
                    rel,
                    new: c.tuple()?,
                },
                m => return Err(c.err(format!("expected `N`, found `{}`", m as char))),
            }
        }
        b'U' => {
            let rel = c.u32("relation oid")?;
            let mut old = None;
            let mut marker = c.u8("tuple marker")?;
            if marker == b'K' || marker == b'O' {
                old = Some(c.tuple()?);
                marker = c.u8("tuple marker")?;
            }
            if marker != b'N' {
                return Err(c.err(format!("expected `N`, found `{}`", marker as char)));
            }
            Message::Update {
                rel,
                old,
                new: c.tuple()?,
            }
        }
        b'D' => {
            let rel = c.u32("relation oid")?;
            match c.u8("tuple marker")? {
                b'K' | b'O' => Message::Delete {
                    rel,
                    old: c.tuple()?,
                },
                m => return Err(c.err(format!("expected `K` or `O`, found `{}`", m as char))),
            }
        }
        b'T' => {
            let n = c.i32("relation count")?;
            c.u8("options")?;
            let mut rels = Vec::with_capacity(n.clamp(0, 1024) as usize);
            for _ in 0..n.max(0) {
                rels.push(c.u32("relation oid")?);
            }
            Message::Truncate { rels }
        }
        b'M' => {
            let flags = c.u8("flags")?;
            c.u64("message LSN")?;
            let prefix = c.string("prefix")?;
            Message::Logical {
                transactional: flags & 1 == 1,
                prefix,
            }
        }
        other => Message::Other(other),
    })
}

/// An LSN in PostgreSQL's text form (`16/B374D848`).
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses PostgreSQL's text form of an LSN.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple_bytes(cells: &[Option<&str>]) -> Vec<u8> {
        let mut b = (cells.len() as i16).to_be_bytes().to_vec();
        for c in cells {
            match c {
                None => b.push(b'n'),
                Some("<u>") => b.push(b'u'),
                Some(v) => {
                    b.push(b't');
                    b.extend((v.len() as i32).to_be_bytes());
                    b.extend(v.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn begin_commit_and_changes_decode() {
        let mut b = vec![b'B'];
        b.extend(0x0000_0001_0000_00A0u64.to_be_bytes());
        b.extend(5_000_000i64.to_be_bytes());
        b.extend(727u32.to_be_bytes());
        assert_eq!(
            decode(&b).unwrap(),
            Message::Begin {
                final_lsn: 0x1_0000_00A0,
                commit_us: 5_000_000,
                xid: 727
            }
        );

        let mut r = vec![b'R'];
        r.extend(16384u32.to_be_bytes());
        r.extend(b"\0appointments\0");
        r.push(b'f');
        r.extend(2i16.to_be_bytes());
        for (name, oid) in [("id", 23u32), ("doc", 3802)] {
            r.push(1);
            r.extend(name.as_bytes());
            r.push(0);
            r.extend(oid.to_be_bytes());
            r.extend((-1i32).to_be_bytes());
        }
        assert_eq!(
            decode(&r).unwrap(),
            Message::Relation {
                oid: 16384,
                namespace: "pg_catalog".into(),
                name: "appointments".into(),
                columns: vec![
                    Column {
                        name: "id".into(),
                        type_oid: 23
                    },
                    Column {
                        name: "doc".into(),
                        type_oid: 3802
                    }
                ]
            }
        );

        let mut u = vec![b'U'];
        u.extend(16384u32.to_be_bytes());
        u.push(b'O');
        u.extend(tuple_bytes(&[Some("1"), Some("{\"a\": 1}")]));
        u.push(b'N');
        u.extend(tuple_bytes(&[Some("2"), Some("<u>")]));
        assert_eq!(
            decode(&u).unwrap(),
            Message::Update {
                rel: 16384,
                old: Some(vec![
                    Cell::Text("1".into()),
                    Cell::Text("{\"a\": 1}".into())
                ]),
                new: vec![Cell::Text("2".into()), Cell::Unchanged],
            }
        );

        let mut d = vec![b'D'];
        d.extend(16384u32.to_be_bytes());
        d.push(b'K');
        d.extend(tuple_bytes(&[Some("2"), None]));
        assert_eq!(
            decode(&d).unwrap(),
            Message::Delete {
                rel: 16384,
                old: vec![Cell::Text("2".into()), Cell::Null]
            }
        );

        let mut m = vec![b'M', 1];
        m.extend(7u64.to_be_bytes());
        m.extend(b"tether.apply\0");
        m.extend(0i32.to_be_bytes());
        assert_eq!(
            decode(&m).unwrap(),
            Message::Logical {
                transactional: true,
                prefix: "tether.apply".into()
            }
        );
    }

    #[test]
    fn damaged_messages_are_named_errors_not_panics() {
        let mut i = vec![b'I'];
        i.extend(16384u32.to_be_bytes());
        i.push(b'N');
        i.extend(3i16.to_be_bytes());
        i.push(b't');
        i.extend(100i32.to_be_bytes());
        i.extend(b"short");
        let e = decode(&i).unwrap_err();
        assert_eq!(e.kind, 'I');
        assert!(e.what.contains("truncated"), "{e}");
        assert!(decode(&[]).is_err());
        assert!(decode(&[b'B', 0, 0]).is_err());
        let mut bad = vec![b'I'];
        bad.extend(1u32.to_be_bytes());
        bad.push(b'N');
        bad.extend(1i16.to_be_bytes());
        bad.push(b't');
        bad.extend((-5i32).to_be_bytes());
        assert!(decode(&bad).unwrap_err().what.contains("negative"));
        // Every prefix of a valid message fails cleanly.
        let mut ok = vec![b'U'];
        ok.extend(9u32.to_be_bytes());
        ok.push(b'N');
        ok.extend(tuple_bytes(&[Some("x"), None]));
        assert!(decode(&ok).is_ok());
        for n in 1..ok.len() {
            assert!(decode(&ok[..n]).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn lsns_round_trip() {
        assert_eq!(lsn_text(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("nope"), None);
    }
}
