//! Column values (PostgreSQL text output, as pgoutput sends them) to JSON
//! exactly as `to_jsonb` renders them, which is what PostgREST and
//! supabase-js hand the app for `select *`.
//!
//! Pure and panic-free: a value that does not parse as its type claims is
//! an [`EncodeError`], and the caller falls back to deleting the key rather
//! than caching something wrong. Numbers are copied digit for digit, so
//! numeric precision is never lost to floating point.
//!
//! The replication session runs with `DateStyle=ISO` and `TimeZone=UTC`
//! (set by the source), so date and time text arrives in the one format
//! this module converts.

use std::fmt::Write as _;

use crate::decode::types::{JsonKind, PgType, TypeCatalog};

/// A value that could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The type is not in the catalog.
    #[error("unknown type oid {0}")]
    UnknownType(u32),
    /// The text is not what its type's output looks like.
    #[error("malformed {what} value")]
    Malformed {
        /// What was being parsed.
        what: &'static str,
    },
}

fn malformed(what: &'static str) -> EncodeError {
    EncodeError::Malformed { what }
}

/// Appends the JSON for `text`, a value of type `oid`.
pub fn write_value(
    out: &mut String,
    text: &str,
    oid: u32,
    types: &TypeCatalog,
) -> Result<(), EncodeError> {
    write_value_depth(out, text, oid, types, 0)
}

/// Nesting bound for arrays of composites of arrays…: deep enough for any
/// real schema, small enough that hostile input cannot exhaust the stack.
const MAX_DEPTH: usize = 32;

fn write_value_depth(
    out: &mut String,
    text: &str,
    oid: u32,
    types: &TypeCatalog,
    depth: usize,
) -> Result<(), EncodeError> {
    if depth > MAX_DEPTH {
        return Err(malformed("deeply nested"));
    }
    match types.resolve(oid).ok_or(EncodeError::UnknownType(oid))? {
        PgType::Scalar(kind) => write_scalar(out, text, *kind),
        PgType::Array { element, delimiter } => {
            let element = *element;
            let parsed = parse_array(text, *delimiter)?;
            write_array(out, &parsed, element, types, depth)
        }
        PgType::Composite(attrs) => {
            let fields = parse_record(text)?;
            if fields.len() != attrs.len() {
                return Err(malformed("composite"));
            }
            out.push('{');
            for (i, ((name, attr_oid), field)) in attrs.iter().zip(&fields).enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, name);
                out.push(':');
                match field {
                    None => out.push_str("null"),
                    Some(v) => write_value_depth(out, v, *attr_oid, types, depth + 1)?,
                }
            }
            out.push('}');
            Ok(())
        }
        PgType::Domain(_) => Err(EncodeError::UnknownType(oid)),
    }
}

fn write_scalar(out: &mut String, text: &str, kind: JsonKind) -> Result<(), EncodeError> {
    match kind {
        JsonKind::Number => {
            if is_json_number(text) {
                out.push_str(text);
            } else if matches!(text, "NaN" | "Infinity" | "-Infinity") {
                write_string(out, text);
            } else {
                return Err(malformed("number"));
            }
        }
        JsonKind::Bool => match text {
            "t" => out.push_str("true"),
            "f" => out.push_str("false"),
            _ => return Err(malformed("boolean")),
        },
        // The server validated it on input; checking again (without
        // building anything) keeps a cached value from ever being invalid.
        JsonKind::Json => {
            serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|_| malformed("json"))?;
            out.push_str(text);
        }
        JsonKind::Date => write_string(out, &iso_date(text)?),
        JsonKind::Timestamp => write_string(out, &iso_timestamp(text, false)?),
        JsonKind::TimestampTz => write_string(out, &iso_timestamp(text, true)?),
        JsonKind::String => write_string(out, text),
    }
    Ok(())
}

/// A JSON number: `-?digits(.digits)?([eE][+-]?digits)?`.
fn is_json_number(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = 0;
    if b.first() == Some(&b'-') {
        i += 1;
    }
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    };
    if !digits(&mut i) {
        return false;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return false;
        }
    }
    i == b.len()
}

/// Appends `text` as a JSON string.
pub fn write_string(out: &mut String, text: &str) {
    out.push('"');
    for ch in text.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Dates are written as the ISO text output, `0044-03-15 BC` included;
/// only a malformed value is refused.
fn iso_date(text: &str) -> Result<String, EncodeError> {
    let body = text.strip_suffix(" BC").unwrap_or(text);
    let valid = matches!(text, "infinity" | "-infinity")
        || (body.len() >= 10 && body.bytes().all(|b| b.is_ascii_digit() || b == b'-'));
    if valid {
        Ok(text.to_string())
    } else {
        Err(malformed("date"))
    }
}

/// `2026-11-26 07:00:00.5+00` → `2026-11-26T07:00:00.5+00:00`; a ` BC`
/// suffix stays at the end, as `to_jsonb` writes it.
fn iso_timestamp(text: &str, with_zone: bool) -> Result<String, EncodeError> {
    if matches!(text, "infinity" | "-infinity") {
        return Ok(text.to_string());
    }
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(b) => (b, " BC"),
        None => (text, ""),
    };
    let (date, time) = body.split_once(' ').ok_or(malformed("timestamp"))?;
    iso_date(date)?;
    let mut out = format!("{date}T{time}");
    if with_zone {
        // The offset starts at the last '+' or '-' of the time part.
        let sign = time.rfind(['+', '-']).ok_or(malformed("timestamptz"))?;
        if !time[sign + 1..].contains(':') {
            out.push_str(":00");
        }
    }
    out.push_str(bc);
    Ok(out)
}

/// A parsed array: nested lists of elements, `None` for NULL.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ArrayNode {
    Element(Option<String>),
    List(Vec<ArrayNode>),
}

fn parse_array(text: &str, delimiter: u8) -> Result<ArrayNode, EncodeError> {
    // Non-default bounds come first: "[0:1]={1,2}"; to_jsonb ignores them.
    let body = if text.starts_with('[') {
        &text[text.find('=').ok_or(malformed("array"))? + 1..]
    } else {
        text
    };
    let bytes = body.as_bytes();
    let mut pos = 0;
    let node = parse_array_list(bytes, &mut pos, delimiter, 0)?;
    if pos != bytes.len() {
        return Err(malformed("array"));
    }
    Ok(node)
}

fn parse_array_list(
    b: &[u8],
    pos: &mut usize,
    delimiter: u8,
    depth: usize,
) -> Result<ArrayNode, EncodeError> {
    if depth > MAX_DEPTH || b.get(*pos) != Some(&b'{') {
        return Err(malformed("array"));
    }
    *pos += 1;
    let mut items = Vec::new();
    if b.get(*pos) == Some(&b'}') {
        *pos += 1;
        return Ok(ArrayNode::List(items));
    }
    loop {
        match b.get(*pos) {
            Some(b'{') => items.push(parse_array_list(b, pos, delimiter, depth + 1)?),
            Some(b'"') => items.push(ArrayNode::Element(Some(parse_quoted(b, pos, false)?))),
            Some(_) => {
                let start = *pos;
                while b.get(*pos).is_some_and(|&c| c != delimiter && c != b'}') {
                    *pos += 1;
                }
                let raw = std::str::from_utf8(&b[start..*pos]).map_err(|_| malformed("array"))?;
                let raw = raw.trim();
                items.push(ArrayNode::Element(if raw.eq_ignore_ascii_case("NULL") {
                    None
                } else {
                    Some(raw.to_string())
                }));
            }
            None => return Err(malformed("array")),
        }
        match b.get(*pos) {
            Some(&c) if c == delimiter => *pos += 1,
            Some(b'}') => {
                *pos += 1;
                return Ok(ArrayNode::List(items));
            }
            _ => return Err(malformed("array")),
        }
    }
}

/// A double-quoted element starting at `pos`: backslash escapes any
/// character; in records (`doubled_quotes`), `""` is a literal quote too.
fn parse_quoted(b: &[u8], pos: &mut usize, doubled_quotes: bool) -> Result<String, EncodeError> {
    *pos += 1;
    let mut value = Vec::new();
    loop {
        match b.get(*pos) {
            None => return Err(malformed("quoted value")),
            Some(b'\\') => {
                let c = *b.get(*pos + 1).ok_or(malformed("quoted value"))?;
                value.push(c);
                *pos += 2;
            }
            Some(b'"') if doubled_quotes && b.get(*pos + 1) == Some(&b'"') => {
                value.push(b'"');
                *pos += 2;
            }
            Some(b'"') => {
                *pos += 1;
                return String::from_utf8(value).map_err(|_| malformed("quoted value"));
            }
            Some(&c) => {
                value.push(c);
                *pos += 1;
            }
        }
    }
}

fn write_array(
    out: &mut String,
    node: &ArrayNode,
    element: u32,
    types: &TypeCatalog,
    depth: usize,
) -> Result<(), EncodeError> {
    match node {
        ArrayNode::Element(None) => out.push_str("null"),
        ArrayNode::Element(Some(v)) => write_value_depth(out, v, element, types, depth + 1)?,
        ArrayNode::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_array(out, item, element, types, depth + 1)?;
            }
            out.push(']');
        }
    }
    Ok(())
}

/// Parses record output `(a,,"b c")`: fields separated by commas, an empty
/// unquoted field is NULL.
pub fn parse_record(text: &str) -> Result<Vec<Option<String>>, EncodeError> {
    let b = text.as_bytes();
    if b.first() != Some(&b'(') || b.last() != Some(&b')') {
        return Err(malformed("composite"));
    }
    let inner = &b[1..b.len() - 1];
    let mut fields = Vec::new();
    let mut pos = 0;
    loop {
        let mut value: Option<Vec<u8>> = None;
        while let Some(&c) = inner.get(pos) {
            match c {
                b',' => break,
                b'"' => {
                    let quoted = parse_quoted(inner, &mut pos, true)?;
                    value
                        .get_or_insert_with(Vec::new)
                        .extend_from_slice(quoted.as_bytes());
                }
                b'\\' => {
                    let c = *inner.get(pos + 1).ok_or(malformed("composite"))?;
                    value.get_or_insert_with(Vec::new).push(c);
                    pos += 2;
                }
                c => {
                    value.get_or_insert_with(Vec::new).push(c);
                    pos += 1;
                }
            }
        }
        fields.push(
            value
                .map(|v| String::from_utf8(v).map_err(|_| malformed("composite")))
                .transpose()?,
        );
        if pos >= inner.len() {
            return Ok(fields);
        }
        pos += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str, oid: u32) -> Result<String, EncodeError> {
        let mut types = TypeCatalog::default();
        types.insert(
            90_000,
            PgType::Composite(vec![("a".into(), 23), ("b".into(), 25)]),
        );
        types.insert(
            90_001,
            PgType::Array {
                element: 90_000,
                delimiter: b',',
            },
        );
        types.insert(90_002, PgType::Domain(23));
        let mut out = String::new();
        write_value(&mut out, text, oid, &types).map(|()| out)
    }

    #[test]
    fn numbers_are_copied_exactly() {
        assert_eq!(json("42", 23).as_deref(), Ok("42"));
        assert_eq!(
            json("-9223372036854775808", 20).as_deref(),
            Ok("-9223372036854775808")
        );
        assert_eq!(
            json("1234567890.123456789012", 1700).as_deref(),
            Ok("1234567890.123456789012")
        );
        assert_eq!(json("1e+100", 701).as_deref(), Ok("1e+100"));
        assert_eq!(json("NaN", 701).as_deref(), Ok("\"NaN\""));
        assert_eq!(json("-Infinity", 700).as_deref(), Ok("\"-Infinity\""));
        assert!(json("12abc", 23).is_err());
        assert!(json("1.", 1700).is_err());
        assert_eq!(
            json("7", 90_002).as_deref(),
            Ok("7"),
            "domains use their base type"
        );
    }

    #[test]
    fn strings_escape_quotes_and_control_characters() {
        assert_eq!(
            json("a\"b\\c\n\u{1}é✓", 25).as_deref(),
            Ok("\"a\\\"b\\\\c\\n\\u0001é✓\"")
        );
        assert_eq!(json("t", 16).as_deref(), Ok("true"));
        assert!(json("yes", 16).is_err());
        assert_eq!(json("{\"a\": [1]}", 3802).as_deref(), Ok("{\"a\": [1]}"));
    }

    #[test]
    fn dates_and_timestamps_become_iso_8601() {
        assert_eq!(json("2026-11-26", 1082).as_deref(), Ok("\"2026-11-26\""));
        assert_eq!(
            json("0044-03-15 BC", 1082).as_deref(),
            Ok("\"0044-03-15 BC\"")
        );
        assert_eq!(
            json("0044-03-15 07:00:00+00 BC", 1184).as_deref(),
            Ok("\"0044-03-15T07:00:00+00:00 BC\"")
        );
        assert_eq!(
            json("2026-11-26 07:00:00.123456", 1114).as_deref(),
            Ok("\"2026-11-26T07:00:00.123456\"")
        );
        assert_eq!(
            json("2026-11-26 07:00:00+00", 1184).as_deref(),
            Ok("\"2026-11-26T07:00:00+00:00\"")
        );
        assert_eq!(
            json("2026-11-26 07:00:00-03:30", 1184).as_deref(),
            Ok("\"2026-11-26T07:00:00-03:30\"")
        );
        assert_eq!(json("infinity", 1184).as_deref(), Ok("\"infinity\""));
        assert!(json("garbage", 1114).is_err());
    }

    #[test]
    fn arrays_nest_quote_and_hold_nulls() {
        assert_eq!(json("{1,2,NULL}", 1007).as_deref(), Ok("[1,2,null]"));
        assert_eq!(json("{{1,2},{3,4}}", 1007).as_deref(), Ok("[[1,2],[3,4]]"));
        assert_eq!(json("{}", 1007).as_deref(), Ok("[]"));
        assert_eq!(json("[0:1]={5,6}", 1007).as_deref(), Ok("[5,6]"));
        assert_eq!(
            json(r#"{"a,b","c\"d","NULL",NULL," x "}"#, 1009).as_deref(),
            Ok(r#"["a,b","c\"d","NULL",null," x "]"#)
        );
        assert_eq!(json("{t,f}", 1000).as_deref(), Ok("[true,false]"));
        for bad in ["{1,2", "1,2}", "{1,{2}", "{\"a}", "", "{1}x"] {
            assert!(json(bad, 1007).is_err(), "{bad}");
        }
    }

    #[test]
    fn composites_become_objects() {
        assert_eq!(
            json("(1,abc)", 90_000).as_deref(),
            Ok(r#"{"a":1,"b":"abc"}"#)
        );
        assert_eq!(json("(,)", 90_000).as_deref(), Ok(r#"{"a":null,"b":null}"#));
        assert_eq!(
            json(r#"(2,"x ""y"", z")"#, 90_000).as_deref(),
            Ok(r#"{"a":2,"b":"x \"y\", z"}"#)
        );
        assert_eq!(
            json(r#"(3,"")"#, 90_000).as_deref(),
            Ok(r#"{"a":3,"b":""}"#)
        );
        assert_eq!(
            json(r#"{"(1,a)",NULL}"#, 90_001).as_deref(),
            Ok(r#"[{"a":1,"b":"a"},null]"#)
        );
        for bad in ["1,abc", "(1)", "(1,2,3)", "(x,abc)"] {
            assert!(json(bad, 90_000).is_err(), "{bad}");
        }
        assert_eq!(json("1", 12345), Err(EncodeError::UnknownType(12345)));
    }

    /// Random text never panics any parser.
    #[test]
    fn random_text_never_panics() {
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        let alphabet = b"{}(),\"\\ NULabc123.-+eE:T";
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 24) as usize;
            let text: String = (0..len)
                .map(|i| alphabet[((state >> (i % 60)) as usize + i) % alphabet.len()] as char)
                .collect();
            for oid in [23, 1700, 1007, 1009, 90_000, 90_001, 1184, 1082] {
                let _ = json(&text, oid);
            }
        }
    }
}
