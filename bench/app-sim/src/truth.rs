//! The newest committed version of every page, as the simulation learns it
//! right after each commit returns, with when it learnt it: a read that
//! returns an older version than the one known when the read started is
//! stale (exactly, since versions only grow), and it has been stale since
//! the first newer version was known.
//!
//! Versions are learnt a moment after the commit (by the writer, reading
//! them back), so staleness is if anything undercounted, never invented.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

/// Versions kept per page to date a stale read.
const HISTORY: usize = 16;

/// The known versions of one page, oldest first.
#[derive(Debug, Default)]
struct History(VecDeque<(i64, Instant)>);

/// Every page's history, indexed by entity (page × users + user).
pub struct Truth {
    pages: Vec<Mutex<History>>,
}

impl Truth {
    /// `entities` pages, none known yet.
    pub fn new(entities: usize) -> Truth {
        Truth {
            pages: (0..entities)
                .map(|_| Mutex::new(History::default()))
                .collect(),
        }
    }

    fn page(&self, entity: usize) -> std::sync::MutexGuard<'_, History> {
        self.pages[entity].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `version` of `entity` is committed, as of `at`.
    pub fn committed(&self, entity: usize, version: i64, at: Instant) {
        let mut page = self.page(entity);
        if page.0.back().is_some_and(|(v, _)| *v >= version) {
            return;
        }
        if page.0.len() == HISTORY {
            page.0.pop_front();
        }
        page.0.push_back((version, at));
    }

    /// The newest version known now.
    pub fn newest(&self, entity: usize) -> i64 {
        self.page(entity).0.back().map_or(0, |(v, _)| *v)
    }

    /// When the first version newer than `version` became known (the
    /// oldest kept one, if the history no longer reaches back).
    pub fn newer_since(&self, entity: usize, version: i64) -> Option<Instant> {
        self.page(entity)
            .0
            .iter()
            .find(|(v, _)| *v > version)
            .map(|(_, at)| *at)
    }
}
