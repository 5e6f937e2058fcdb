//! A parser for the `pgoutput` logical decoding protocol, version 1.
//!
//! Pure: bytes in, typed messages out. Every read is bounds-checked and a
//! malformed message becomes a [`DecodeError`], never a panic, because the
//! bytes come from the network. Column values are slices of the input
//! buffer ([`Bytes`]), so decoding a row copies nothing.
//!
//! One parser function per message, in the order the protocol documents
//! them ("Logical Replication Message Formats" in the PostgreSQL manual).

use bytes::Bytes;

use crate::lsn::Lsn;

/// A message that could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The message ended before a field it announced.
    #[error(
        "pgoutput message {tag:?} is truncated: needed {needed} more bytes at offset {offset}"
    )]
    Truncated {
        /// The message tag.
        tag: char,
        /// Where the missing field starts.
        offset: usize,
        /// How many bytes were missing.
        needed: usize,
    },
    /// A byte that should select a variant did not.
    #[error("pgoutput message {tag:?} has unexpected byte {found:?} at offset {offset}")]
    Unexpected {
        /// The message tag.
        tag: char,
        /// Where the byte is.
        offset: usize,
        /// The byte read.
        found: char,
    },
    /// A count or length that is negative.
    #[error("pgoutput message {tag:?} has a negative length at offset {offset}")]
    NegativeLength {
        /// The message tag.
        tag: char,
        /// Where the length is.
        offset: usize,
    },
    /// The message was empty.
    #[error("empty pgoutput message")]
    Empty,
}

/// One column value of a row as pgoutput sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    /// SQL NULL, or a non-identity column of an old-key tuple.
    Null,
    /// An unchanged TOASTed value: the server did not send it.
    UnchangedToast,
    /// The value in PostgreSQL's text output format.
    Text(Bytes),
    /// The value in binary format (only when the binary option is on).
    Binary(Bytes),
}

/// A row: one [`Datum`] per column of the relation, in column order.
pub type Tuple = Vec<Datum>;

/// Which old row an UPDATE or DELETE carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldTupleKind {
    /// `K`: only the replica identity columns are set; the rest are NULL.
    Key,
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full,
}

/// One column of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Whether the column is part of the replica identity.
    pub is_identity: bool,
    /// The column name.
    pub name: String,
    /// The column's type OID.
    pub type_oid: u32,
    /// The type modifier (`atttypmod`).
    pub type_modifier: i32,
}

/// The description of a table the stream refers to by OID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The table's OID.
    pub oid: u32,
    /// The schema name.
    pub namespace: String,
    /// The table name.
    pub name: String,
    /// `relreplident`: d(efault), n(othing), f(ull) or i(ndex).
    pub replica_identity: u8,
    /// The columns in attribute order.
    pub columns: Vec<RelationColumn>,
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Start of a committed transaction.
    Begin {
        /// The LSN of the commit record.
        final_lsn: Lsn,
        /// Commit time in microseconds since 2000-01-01 UTC.
        commit_time_micros: i64,
        /// The transaction id.
        xid: u32,
    },
    /// End of a transaction.
    Commit {
        /// The LSN of the commit record.
        commit_lsn: Lsn,
        /// The LSN just past the commit record: what to confirm.
        end_lsn: Lsn,
        /// Commit time in microseconds since 2000-01-01 UTC.
        commit_time_micros: i64,
    },
    /// The transaction came from another origin.
    Origin {
        /// The commit LSN on the origin server.
        lsn: Lsn,
        /// The origin's name.
        name: String,
    },
    /// A table description.
    Relation(Relation),
    /// A data type description (sent for non-built-in types).
    Type {
        /// The type's OID.
        oid: u32,
        /// The schema name.
        namespace: String,
        /// The type name.
        name: String,
    },
    /// A row was inserted.
    Insert {
        /// The table's OID.
        relation: u32,
        /// The new row.
        new: Tuple,
    },
    /// A row was updated.
    Update {
        /// The table's OID.
        relation: u32,
        /// The old row, when the server sent one.
        old: Option<(OldTupleKind, Tuple)>,
        /// The new row.
        new: Tuple,
    },
    /// A row was deleted.
    Delete {
        /// The table's OID.
        relation: u32,
        /// The old row (identity columns, or all under FULL).
        old: (OldTupleKind, Tuple),
    },
    /// Tables were truncated.
    Truncate {
        /// CASCADE (1) / RESTART IDENTITY (2) bits.
        options: u8,
        /// The truncated tables' OIDs.
        relations: Vec<u32>,
    },
    /// A logical decoding message (`pg_logical_emit_message`).
    Emitted {
        /// Whether it was part of a transaction.
        transactional: bool,
        /// Its LSN.
        lsn: Lsn,
        /// The prefix given by the writer.
        prefix: String,
        /// The content.
        content: Bytes,
    },
}

/// Decodes one pgoutput message.
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let tag = *data.first().ok_or(DecodeError::Empty)?;
    let mut r = Reader {
        data,
        pos: 1,
        tag: char::from(tag),
    };
    match tag {
        b'B' => parse_begin(&mut r),
        b'C' => parse_commit(&mut r),
        b'O' => parse_origin(&mut r),
        b'R' => parse_relation(&mut r),
        b'Y' => parse_type(&mut r),
        b'I' => parse_insert(&mut r),
        b'U' => parse_update(&mut r),
        b'D' => parse_delete(&mut r),
        b'T' => parse_truncate(&mut r),
        b'M' => parse_logical_message(&mut r),
        other => Err(DecodeError::Unexpected {
            tag: char::from(other),
            offset: 0,
            found: char::from(other),
        }),
    }
}

fn parse_begin(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    Ok(Message::Begin {
        final_lsn: r.lsn()?,
        commit_time_micros: r.i64()?,
        xid: r.u32()?,
    })
}

fn parse_commit(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let _flags = r.u8()?;
    Ok(Message::Commit {
        commit_lsn: r.lsn()?,
        end_lsn: r.lsn()?,
        commit_time_micros: r.i64()?,
    })
}

fn parse_origin(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    Ok(Message::Origin {
        lsn: r.lsn()?,
        name: r.cstring()?,
    })
}

fn parse_relation(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let oid = r.u32()?;
    let namespace = r.cstring()?;
    let name = r.cstring()?;
    let replica_identity = r.u8()?;
    let count = r.count16()?;
    let mut columns = Vec::with_capacity(count.min(1600));
    for _ in 0..count {
        let flags = r.u8()?;
        columns.push(RelationColumn {
            is_identity: flags & 1 == 1,
            name: r.cstring()?,
            type_oid: r.u32()?,
            type_modifier: r.i32()?,
        });
    }
    Ok(Message::Relation(Relation {
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    }))
}

fn parse_type(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    Ok(Message::Type {
        oid: r.u32()?,
        namespace: r.cstring()?,
        name: r.cstring()?,
    })
}

fn parse_insert(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let relation = r.u32()?;
    r.expect(b'N')?;
    Ok(Message::Insert {
        relation,
        new: r.tuple()?,
    })
}

fn parse_update(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let relation = r.u32()?;
    let old = match r.peek()? {
        b'K' | b'O' => {
            let kind = r.old_tuple_kind()?;
            Some((kind, r.tuple()?))
        }
        _ => None,
    };
    r.expect(b'N')?;
    Ok(Message::Update {
        relation,
        old,
        new: r.tuple()?,
    })
}

fn parse_delete(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let relation = r.u32()?;
    let kind = r.old_tuple_kind()?;
    Ok(Message::Delete {
        relation,
        old: (kind, r.tuple()?),
    })
}

fn parse_truncate(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let count = r.count32()?;
    let options = r.u8()?;
    let mut relations = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        relations.push(r.u32()?);
    }
    Ok(Message::Truncate { options, relations })
}

fn parse_logical_message(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let flags = r.u8()?;
    let lsn = r.lsn()?;
    let prefix = r.cstring()?;
    let len = r.count32()?;
    Ok(Message::Emitted {
        transactional: flags & 1 == 1,
        lsn,
        prefix,
        content: r.bytes(len)?,
    })
}

/// A bounds-checked cursor over one message.
struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    tag: char,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.data.len());
        match end {
            Some(end) => {
                let slice = &self.data[self.pos..end];
                self.pos = end;
                Ok(slice)
            }
            None => Err(DecodeError::Truncated {
                tag: self.tag,
                offset: self.pos,
                needed: n - (self.data.len() - self.pos),
            }),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn peek(&self) -> Result<u8, DecodeError> {
        self.data
            .get(self.pos)
            .copied()
            .ok_or(DecodeError::Truncated {
                tag: self.tag,
                offset: self.pos,
                needed: 1,
            })
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        Ok(Lsn(u64::from_be_bytes(self.array()?)))
    }

    fn negative(&self, at: usize) -> DecodeError {
        DecodeError::NegativeLength {
            tag: self.tag,
            offset: at,
        }
    }

    fn count16(&mut self) -> Result<usize, DecodeError> {
        let at = self.pos;
        usize::try_from(self.i16()?).map_err(|_| self.negative(at))
    }

    fn count32(&mut self) -> Result<usize, DecodeError> {
        let at = self.pos;
        usize::try_from(self.i32()?).map_err(|_| self.negative(at))
    }

    fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n)?;
        Ok(self.data.slice(start..self.pos))
    }

    fn cstring(&mut self) -> Result<String, DecodeError> {
        let rest = &self.data[self.pos..];
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated {
                tag: self.tag,
                offset: self.data.len(),
                needed: 1,
            })?;
        let text = String::from_utf8_lossy(&rest[..len]).into_owned();
        self.pos += len + 1;
        Ok(text)
    }

    fn expect(&mut self, wanted: u8) -> Result<(), DecodeError> {
        let at = self.pos;
        let found = self.u8()?;
        if found == wanted {
            Ok(())
        } else {
            Err(DecodeError::Unexpected {
                tag: self.tag,
                offset: at,
                found: char::from(found),
            })
        }
    }

    fn old_tuple_kind(&mut self) -> Result<OldTupleKind, DecodeError> {
        let at = self.pos;
        match self.u8()? {
            b'K' => Ok(OldTupleKind::Key),
            b'O' => Ok(OldTupleKind::Full),
            other => Err(DecodeError::Unexpected {
                tag: self.tag,
                offset: at,
                found: char::from(other),
            }),
        }
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let count = self.count16()?;
        let mut tuple = Vec::with_capacity(count);
        for _ in 0..count {
            let at = self.pos;
            let datum = match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                b't' => {
                    let len = self.count32()?;
                    Datum::Text(self.bytes(len)?)
                }
                b'b' => {
                    let len = self.count32()?;
                    Datum::Binary(self.bytes(len)?)
                }
                other => {
                    return Err(DecodeError::Unexpected {
                        tag: self.tag,
                        offset: at,
                        found: char::from(other),
                    })
                }
            };
            tuple.push(datum);
        }
        Ok(tuple)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds pgoutput messages for tests.
    #[derive(Default)]
    pub(crate) struct MessageBuilder(Vec<u8>);

    impl MessageBuilder {
        pub(crate) fn new(tag: u8) -> Self {
            MessageBuilder(vec![tag])
        }
        pub(crate) fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        pub(crate) fn i16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn i64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn cstr(mut self, s: &str) -> Self {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
            self
        }
        /// A tuple of text values (`None` = NULL).
        pub(crate) fn tuple(mut self, values: &[Option<&str>]) -> Self {
            self = self.i16(values.len() as i16);
            for v in values {
                match v {
                    None => self = self.u8(b'n'),
                    Some(t) => {
                        self = self.u8(b't').i32(t.len() as i32);
                        self.0.extend_from_slice(t.as_bytes());
                    }
                }
            }
            self
        }
        pub(crate) fn build(self) -> Bytes {
            Bytes::from(self.0)
        }
    }

    pub(crate) fn relation_message(oid: i32, name: &str, cols: &[(&str, bool)]) -> Bytes {
        let mut b = MessageBuilder::new(b'R')
            .i32(oid)
            .cstr("public")
            .cstr(name)
            .u8(b'd')
            .i16(cols.len() as i16);
        for (col, key) in cols {
            b = b.u8(u8::from(*key)).cstr(col).i32(25).i32(-1);
        }
        b.build()
    }

    fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn decodes_begin_and_commit() {
        let begin = MessageBuilder::new(b'B').i64(0x100).i64(42).i32(7).build();
        assert_eq!(
            decode(&begin),
            Ok(Message::Begin {
                final_lsn: Lsn(0x100),
                commit_time_micros: 42,
                xid: 7
            })
        );
        let commit = MessageBuilder::new(b'C')
            .u8(0)
            .i64(0x100)
            .i64(0x130)
            .i64(42)
            .build();
        assert_eq!(
            decode(&commit),
            Ok(Message::Commit {
                commit_lsn: Lsn(0x100),
                end_lsn: Lsn(0x130),
                commit_time_micros: 42
            })
        );
    }

    #[test]
    fn decodes_relation_with_identity_flags() {
        let msg = relation_message(16384, "profiles", &[("id", true), ("username", false)]);
        let Ok(Message::Relation(rel)) = decode(&msg) else {
            panic!("not a relation")
        };
        assert_eq!(rel.oid, 16384);
        assert_eq!(rel.name, "profiles");
        assert_eq!(rel.columns.len(), 2);
        assert!(rel.columns[0].is_identity);
        assert!(!rel.columns[1].is_identity);
    }

    #[test]
    fn decodes_update_with_old_key_and_null_and_toast() {
        let mut b = MessageBuilder::new(b'U')
            .i32(5)
            .u8(b'K')
            .tuple(&[Some("1"), None])
            .u8(b'N')
            .i16(3)
            .u8(b't')
            .i32(1);
        b.0.push(b'2');
        let msg = b.u8(b'n').u8(b'u').build();
        assert_eq!(
            decode(&msg),
            Ok(Message::Update {
                relation: 5,
                old: Some((OldTupleKind::Key, vec![text("1"), Datum::Null])),
                new: vec![text("2"), Datum::Null, Datum::UnchangedToast],
            })
        );
    }

    #[test]
    fn decodes_update_without_old_tuple_and_delete_and_truncate() {
        let msg = MessageBuilder::new(b'U')
            .i32(5)
            .u8(b'N')
            .tuple(&[Some("a")])
            .build();
        assert!(matches!(
            decode(&msg),
            Ok(Message::Update { old: None, .. })
        ));
        let msg = MessageBuilder::new(b'D')
            .i32(5)
            .u8(b'O')
            .tuple(&[Some("a")])
            .build();
        assert_eq!(
            decode(&msg),
            Ok(Message::Delete {
                relation: 5,
                old: (OldTupleKind::Full, vec![text("a")])
            })
        );
        let msg = MessageBuilder::new(b'T').i32(2).u8(1).i32(5).i32(6).build();
        assert_eq!(
            decode(&msg),
            Ok(Message::Truncate {
                options: 1,
                relations: vec![5, 6]
            })
        );
    }

    #[test]
    fn decodes_logical_message_type_and_origin() {
        let msg = MessageBuilder::new(b'M')
            .u8(0)
            .i64(9)
            .cstr("pgci")
            .i32(2)
            .u8(b'h')
            .u8(b'i')
            .build();
        assert!(matches!(
            decode(&msg),
            Ok(Message::Emitted { transactional: false, ref prefix, ref content, .. })
                if prefix == "pgci" && content.as_ref() == b"hi"
        ));
        let msg = MessageBuilder::new(b'Y')
            .i32(9)
            .cstr("public")
            .cstr("mood")
            .build();
        assert!(matches!(decode(&msg), Ok(Message::Type { oid: 9, .. })));
        let msg = MessageBuilder::new(b'O').i64(1).cstr("other").build();
        assert!(matches!(decode(&msg), Ok(Message::Origin { .. })));
    }

    /// Every prefix of every valid message is rejected with an error, never
    /// a panic: the decoder bounds-checks each field.
    #[test]
    fn every_truncation_of_valid_messages_is_an_error() {
        let messages = [
            MessageBuilder::new(b'B').i64(1).i64(2).i32(3).build(),
            MessageBuilder::new(b'C').u8(0).i64(1).i64(2).i64(3).build(),
            relation_message(1, "t", &[("id", true), ("name", false)]),
            MessageBuilder::new(b'I')
                .i32(1)
                .u8(b'N')
                .tuple(&[Some("abc"), None])
                .build(),
            MessageBuilder::new(b'U')
                .i32(1)
                .u8(b'O')
                .tuple(&[Some("x")])
                .u8(b'N')
                .tuple(&[Some("y")])
                .build(),
            MessageBuilder::new(b'D')
                .i32(1)
                .u8(b'K')
                .tuple(&[Some("x")])
                .build(),
            MessageBuilder::new(b'T').i32(2).u8(0).i32(1).i32(2).build(),
            MessageBuilder::new(b'M')
                .u8(1)
                .i64(1)
                .cstr("p")
                .i32(3)
                .u8(1)
                .u8(2)
                .u8(3)
                .build(),
            MessageBuilder::new(b'Y').i32(1).cstr("s").cstr("t").build(),
            MessageBuilder::new(b'O').i64(1).cstr("o").build(),
        ];
        for msg in messages {
            assert!(decode(&msg).is_ok(), "full message decodes: {msg:?}");
            for len in 0..msg.len() {
                assert!(
                    decode(&msg.slice(..len)).is_err(),
                    "prefix of {len} bytes of {msg:?} must be an error"
                );
            }
        }
    }

    #[test]
    fn rejects_unknown_tags_bad_markers_and_negative_lengths() {
        assert!(decode(&Bytes::from_static(b"Z")).is_err());
        let bad_marker = MessageBuilder::new(b'I').i32(1).u8(b'X').build();
        assert!(decode(&bad_marker).is_err());
        let bad_kind = MessageBuilder::new(b'I')
            .i32(1)
            .u8(b'N')
            .i16(1)
            .u8(b'q')
            .build();
        assert!(decode(&bad_kind).is_err());
        let negative = MessageBuilder::new(b'I')
            .i32(1)
            .u8(b'N')
            .i16(1)
            .u8(b't')
            .i32(-5)
            .build();
        assert!(matches!(
            decode(&negative),
            Err(DecodeError::NegativeLength { .. })
        ));
        let negative_cols = MessageBuilder::new(b'I').i32(1).u8(b'N').i16(-1).build();
        assert!(decode(&negative_cols).is_err());
        let huge = MessageBuilder::new(b'T').i32(i32::MAX).u8(0).build();
        assert!(decode(&huge).is_err());
    }

    /// Pseudo-random byte strings (a fixed-seed xorshift, so failures
    /// reproduce) never make the decoder panic.
    #[test]
    fn random_bytes_never_panic() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let tags = b"BCORYIUDTMZ";
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(first) = buf.first_mut() {
                *first = tags[(next() % tags.len() as u64) as usize];
            }
            let _ = decode(&Bytes::from(buf));
        }
    }
}
