//! Loads what the JSON encoder needs about types it does not know built
//! in (enums, domains, composites, their arrays, extension types).

use crate::change::TableSchema;
use crate::db::{ConnInfo, Db, DbError};
use crate::decode::types::{JsonKind, PgType, TypeCatalog};
use crate::plan::Planner;

/// Loads every OID in `missing`, and whatever those refer to, into
/// `catalog`.
pub async fn load_types(
    db: &Db,
    catalog: &mut TypeCatalog,
    mut missing: Vec<u32>,
) -> Result<(), DbError> {
    // Each round loads one level (a composite's attribute types, an array's
    // element type); schemas are shallow, and the bound stops a cycle.
    for _ in 0..16 {
        if missing.is_empty() {
            return Ok(());
        }
        let rows = db
            .client()
            .query(
                "select t.oid, t.typtype::text, t.typcategory::text, t.typelem, t.typbasetype, \
                        t.typrelid, coalesce(e.typdelim, ',')::text \
                   from pg_type t left join pg_type e on e.oid = t.typelem \
                  where t.oid = any($1)",
                &[&missing],
            )
            .await
            .map_err(DbError::query("reading column types"))?;
        for row in &rows {
            let oid: u32 = row.get(0);
            let typtype: String = row.get(1);
            let category: String = row.get(2);
            let element: u32 = row.get(3);
            let base: u32 = row.get(4);
            let relid: u32 = row.get(5);
            let delimiter: String = row.get(6);
            let ty = match (typtype.as_str(), category.as_str()) {
                ("d", _) => PgType::Domain(base),
                ("c", _) => PgType::Composite(composite_attributes(db, relid).await?),
                (_, "A") if element != 0 => PgType::Array {
                    element,
                    delimiter: delimiter.bytes().next().unwrap_or(b','),
                },
                _ => PgType::Scalar(TypeCatalog::builtin_kind(oid).unwrap_or(JsonKind::String)),
            };
            catalog.insert(oid, ty);
        }
        for oid in &missing {
            if catalog.resolve(*oid).is_none() && !rows.iter().any(|r| r.get::<_, u32>(0) == *oid) {
                // Not in pg_type (dropped meanwhile): its text is a string.
                catalog.insert(*oid, PgType::Scalar(JsonKind::String));
            }
        }
        missing = catalog.missing(missing.iter().copied());
    }
    Ok(())
}

async fn composite_attributes(db: &Db, relid: u32) -> Result<Vec<(String, u32)>, DbError> {
    Ok(db
        .client()
        .query(
            "select attname::text, atttypid from pg_attribute \
              where attrelid = $1 and attnum > 0 and not attisdropped order by attnum",
            &[&relid],
        )
        .await
        .map_err(DbError::query("reading a composite type's attributes"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// The longest loading a table's column types may take before its
/// connection counts as dead (see [`crate::db::within`]).
const LOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Loads the column types refresh rules need, on a regular connection
/// opened when first needed.
pub struct TypeLoader {
    conn: ConnInfo,
    db: Option<Db>,
}

impl TypeLoader {
    /// A loader that connects with `conn` when first needed.
    pub fn new(conn: ConnInfo) -> Self {
        TypeLoader { conn, db: None }
    }

    /// Loads the types of `schema` the planner is missing. On failure the
    /// rows of unknown types are deleted instead of written (the encoder
    /// refuses them), which is safe; the next description retries.
    pub async fn load(&mut self, planner: &mut Planner, schema: &TableSchema) {
        let missing = planner.missing_types(schema);
        if missing.is_empty() {
            return;
        }
        if self.db.is_none() {
            match Db::connect(&self.conn).await {
                Ok(db) => self.db = Some(db),
                Err(error) => {
                    tracing::warn!(error = %error, "cannot load column types; rows of those types will be deleted instead of refreshed");
                    return;
                }
            }
        }
        if let Some(db) = &self.db {
            let loading = load_types(db, planner.types_mut(), missing);
            if let Err(error) =
                crate::db::within("reading column types", LOAD_TIMEOUT, loading).await
            {
                tracing::warn!(error = %error, "cannot load column types; rows of those types will be deleted instead of refreshed");
                self.db = None;
            }
        }
    }
}
