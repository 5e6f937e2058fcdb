//! Cache tags (Next.js `cacheTag`, `revalidateTag`) kept true by the
//! daemon: a rule's `tags = ["profile:{id}"]` names the tags a row's pages
//! carry, and at each change of the row the daemon deletes those tags'
//! marks, in the batch (and the second pass) that deletes the row's keys.
//!
//! A tag's mark (`pgci:tag:<tag>`) holds the Redis server's time, in
//! milliseconds, from which on pages carrying the tag may be trusted: the
//! Next.js cache handler creates it (`SET NX` with Redis's `TIME`) when it
//! stores a page with the tag, and serves a stored page only while every
//! one of its tags has a mark older than the page's rendering. A missing
//! mark therefore means "revalidated just now": a deletion by the daemon,
//! a flush (TRUNCATE, a lost slot, `flush --rule`) or an eviction under
//! `maxmemory` can only make pages render again, never keep an old one.
//! The price: the first page stored after a change was rendered before
//! its tag's new mark, so it renders once more at the next request.

/// The key prefix of tag marks.
pub const TAG_KEY_PREFIX: &str = "pgci:tag:";

/// The key holding `tag`'s mark.
pub fn key(tag: &str) -> String {
    format!("{TAG_KEY_PREFIX}{tag}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_name_their_tags() {
        assert_eq!(super::key("profile:1"), "pgci:tag:profile:1");
    }
}
