//! `[[rules]]` as written in the file; [`crate::plan::rules::compile`]
//! turns them into typed rules (key templates parsed once).

use serde::Deserialize;

use crate::change::TableName;
use crate::duration::HumanDuration;

/// What the app caches under a `delete` rule's keys, so `verify` can
/// compare them with the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Holds {
    /// The row's JSON as `select *` returns it through Supabase/PostgREST
    /// (`to_jsonb` of the row).
    Row,
}

/// What the daemon does with a rule's keys when a row changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Action {
    /// Remove the keys; the app's next read repopulates them.
    #[default]
    Delete,
    /// Write the new row into the keys.
    Refresh,
}

super::named_values!(Holds, "holds", ["row" => Holds::Row]);
super::named_values!(Action, "action", ["delete" => Action::Delete, "refresh" => Action::Refresh]);

impl Action {
    /// The name used in events and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Delete => "delete",
            Action::Refresh => "refresh",
        }
    }
}

/// One `[[rules]]` entry as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// `schema.table` (or `table` for `public.table`).
    pub table: TableName,
    /// Key templates such as `profile:user:{id}`.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Cache tags the row's pages carry (Next.js `cacheTag`), templates
    /// such as `profile:{id}`: marked revalidated at each change.
    #[serde(default)]
    pub tags: Vec<String>,
    /// What to do with the keys.
    #[serde(default)]
    pub action: Action,
    /// `refresh` only: how long the written value lives (`"1h"`, `"5m"`).
    #[serde(default)]
    pub ttl: Option<HumanDuration>,
    /// `refresh` only: which columns the cached row holds.
    #[serde(default)]
    pub columns: Option<ColumnsConfig>,
    /// `refresh` only: SQL whose single JSON value is cached instead of the
    /// row; `$1`, `$2`… are `params`, passed as text.
    #[serde(default)]
    pub query: Option<String>,
    /// Columns of the changed row passed to `query`, in order.
    #[serde(default)]
    pub params: Option<Vec<String>>,
    /// `delete` only: what the app caches under the keys (`"row"`), so
    /// `verify` can check them; refresh rules say it themselves.
    #[serde(default)]
    pub holds: Option<Holds>,
}

/// `columns = { include = [...] }` or `{ exclude = [...] }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnsConfig {
    /// Only these columns are cached.
    #[serde(default)]
    pub include: Option<Vec<String>>,
    /// These columns are never cached.
    #[serde(default)]
    pub exclude: Option<Vec<String>>,
}
