//! A refreshed row as JSON, shaped as `to_jsonb` renders it (the value
//! encoders are in [`crate::decode::json`]), and the text parameters of
//! aggregate-key queries.
//!
//! A cached column whose value did not travel (an unchanged TOASTed value)
//! or cannot be encoded makes the whole row uncacheable: the caller deletes
//! its keys instead, so nothing wrong is ever cached.

use crate::change::{Row, Value};
use crate::decode::json::{write_string, write_value};
use crate::decode::types::TypeCatalog;

/// Why a row could not be cached: the column, and what went wrong.
pub type NotCached<'a> = (&'a str, String);

/// The row as a JSON object of the cached `columns` (position, name, type
/// OID), or the first column whose value did not travel or cannot be
/// encoded.
pub fn encode_row<'a>(
    row: &Row,
    columns: &'a [(usize, String, u32)],
    types: &TypeCatalog,
) -> Result<String, NotCached<'a>> {
    let mut json = String::with_capacity(256);
    json.push('{');
    for (n, (i, name, oid)) in columns.iter().enumerate() {
        if n > 0 {
            json.push(',');
        }
        write_string(&mut json, name);
        json.push(':');
        match row.get(*i) {
            Some(Value::Null) => json.push_str("null"),
            Some(Value::Text(bytes)) => {
                let text = std::str::from_utf8(bytes)
                    .map_err(|_| (name.as_str(), "not UTF-8".to_string()))?;
                write_value(&mut json, text, *oid, types)
                    .map_err(|e| (name.as_str(), format!("{e} (type oid {oid})")))?;
            }
            Some(Value::Unchanged) => {
                return Err((
                    name.as_str(),
                    "unchanged TOASTed value not in the stream".into(),
                ))
            }
            None => return Err((name.as_str(), "value not in the stream".into())),
        }
    }
    json.push('}');
    Ok(json)
}

/// The query parameters from `row`, or `None` if one did not travel.
pub fn param_values(row: &Row, params: &[usize]) -> Option<Vec<Option<String>>> {
    params
        .iter()
        .map(|i| match row.get(*i)? {
            Value::Null => Some(None),
            Value::Text(bytes) => Some(Some(String::from_utf8_lossy(bytes).into_owned())),
            Value::Unchanged => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn rows_encode_or_name_the_column_that_did_not_travel() {
        let types = TypeCatalog::default();
        let text = |s: &str| Value::Text(Bytes::copy_from_slice(s.as_bytes()));
        let columns = vec![(0, "id".to_string(), 23), (1, "bio".to_string(), 25)];
        let row = vec![text("7"), text("hi \"there\"")];
        assert_eq!(
            encode_row(&row, &columns, &types).expect("encodes"),
            r#"{"id":7,"bio":"hi \"there\""}"#
        );
        let row = vec![text("7"), Value::Unchanged];
        assert_eq!(encode_row(&row, &columns, &types).unwrap_err().0, "bio");
        let row = vec![text("7"), Value::Null];
        assert_eq!(
            encode_row(&row, &columns, &types).expect("encodes"),
            r#"{"id":7,"bio":null}"#
        );
        assert_eq!(
            param_values(&vec![text("a"), Value::Null], &[1, 0]),
            Some(vec![None, Some("a".to_string())])
        );
        assert_eq!(param_values(&vec![Value::Unchanged], &[0]), None);
    }
}
