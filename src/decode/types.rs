//! What the JSON encoder needs to know about column types: which JSON
//! shape `to_jsonb` gives each type. Built-in types are known up front;
//! others (enums, domains, composites, their arrays) are loaded from
//! `pg_type` when a Relation message names them (see `db::types`).

use std::collections::HashMap;

/// How `to_jsonb` renders a scalar type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonKind {
    /// int2/4/8, oid, float4/8, numeric: a JSON number (NaN and infinities
    /// as strings).
    Number,
    /// bool.
    Bool,
    /// json, jsonb: embedded as is.
    Json,
    /// date: ISO 8601.
    Date,
    /// timestamp: ISO 8601 with `T`.
    Timestamp,
    /// timestamptz: ISO 8601 with `T` and a `+hh:mm` offset.
    TimestampTz,
    /// Everything else: the text output as a JSON string.
    String,
}

/// A type as far as JSON encoding is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgType {
    /// A scalar.
    Scalar(JsonKind),
    /// An array of `element`, written with `delimiter` between elements.
    Array {
        /// Element type OID.
        element: u32,
        /// `typdelim` of the element type (`,` for almost all).
        delimiter: u8,
    },
    /// A composite (row) type: attribute names and type OIDs in order.
    Composite(Vec<(String, u32)>),
    /// A domain over `base`.
    Domain(u32),
}

/// Known types by OID.
#[derive(Debug, Clone)]
pub struct TypeCatalog {
    types: HashMap<u32, PgType>,
}

const SCALARS: &[(u32, JsonKind)] = &[
    (16, JsonKind::Bool),
    (20, JsonKind::Number),
    (21, JsonKind::Number),
    (23, JsonKind::Number),
    (26, JsonKind::Number),
    (700, JsonKind::Number),
    (701, JsonKind::Number),
    (1700, JsonKind::Number),
    (114, JsonKind::Json),
    (3802, JsonKind::Json),
    (1082, JsonKind::Date),
    (1114, JsonKind::Timestamp),
    (1184, JsonKind::TimestampTz),
    (17, JsonKind::String),
    (18, JsonKind::String),
    (19, JsonKind::String),
    (25, JsonKind::String),
    (1042, JsonKind::String),
    (1043, JsonKind::String),
    (2950, JsonKind::String),
    (1083, JsonKind::String),
    (1266, JsonKind::String),
    (1186, JsonKind::String),
];

/// (array OID, element OID) of the built-in arrays.
const ARRAYS: &[(u32, u32)] = &[
    (1000, 16),
    (1016, 20),
    (1005, 21),
    (1007, 23),
    (1028, 26),
    (1021, 700),
    (1022, 701),
    (1231, 1700),
    (199, 114),
    (3807, 3802),
    (1182, 1082),
    (1115, 1114),
    (1185, 1184),
    (1001, 17),
    (1002, 18),
    (1003, 19),
    (1009, 25),
    (1014, 1042),
    (1015, 1043),
    (2951, 2950),
    (1183, 1083),
    (1270, 1266),
    (1187, 1186),
];

impl Default for TypeCatalog {
    fn default() -> Self {
        let mut types = HashMap::new();
        for &(oid, kind) in SCALARS {
            types.insert(oid, PgType::Scalar(kind));
        }
        for &(oid, element) in ARRAYS {
            types.insert(
                oid,
                PgType::Array {
                    element,
                    delimiter: b',',
                },
            );
        }
        TypeCatalog { types }
    }
}

impl TypeCatalog {
    /// The JSON kind `to_jsonb` uses for a built-in scalar OID, if it is one
    /// with a special kind (loaded types of category other than these are
    /// strings).
    pub fn builtin_kind(oid: u32) -> Option<JsonKind> {
        SCALARS.iter().find(|(o, _)| *o == oid).map(|(_, k)| *k)
    }

    /// Adds or replaces a type.
    pub fn insert(&mut self, oid: u32, ty: PgType) {
        self.types.insert(oid, ty);
    }

    /// The type, following domains to their base type.
    pub fn resolve(&self, mut oid: u32) -> Option<&PgType> {
        for _ in 0..32 {
            match self.types.get(&oid)? {
                PgType::Domain(base) => oid = *base,
                other => return Some(other),
            }
        }
        None
    }

    /// OIDs reachable from `roots` (through arrays, composites and
    /// domains) that are not known yet.
    pub fn missing(&self, roots: impl IntoIterator<Item = u32>) -> Vec<u32> {
        let mut missing = Vec::new();
        let mut stack: Vec<u32> = roots.into_iter().collect();
        let mut seen = std::collections::HashSet::new();
        while let Some(oid) = stack.pop() {
            if !seen.insert(oid) {
                continue;
            }
            match self.types.get(&oid) {
                None => missing.push(oid),
                Some(PgType::Scalar(_)) => {}
                Some(PgType::Array { element, .. }) => stack.push(*element),
                Some(PgType::Domain(base)) => stack.push(*base),
                Some(PgType::Composite(attrs)) => stack.extend(attrs.iter().map(|(_, t)| *t)),
            }
        }
        missing
    }
}
