//! Redis Cluster's hash-tag rule, in one place: the part of a key between
//! the first `{` and the next `}` (when not empty) is what its hash slot is
//! computed from. The daemon routes by it and names the keys that must
//! share a slot with another (a version key beside its value, the events'
//! sequence record beside the channel) with it.

/// The hash tag of `key`, if it has a non-empty one.
pub fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|b| *b == b'{')?;
    let rest = &key[open + 1..];
    let len = rest.iter().position(|b| *b == b'}')?;
    (len > 0).then(|| &rest[..len])
}

#[cfg(test)]
mod tests {
    use super::hash_tag;

    #[test]
    fn the_first_non_empty_braces_are_the_tag() {
        assert_eq!(hash_tag(b"{user1000}.following"), Some(&b"user1000"[..]));
        assert_eq!(hash_tag(b"foo{}{bar}"), None);
        assert_eq!(hash_tag(b"foo{{bar}}zap"), Some(&b"{bar"[..]));
        assert_eq!(hash_tag(b"foo{bar}{zap}"), Some(&b"bar"[..]));
        assert_eq!(hash_tag(b"plain"), None);
        assert_eq!(hash_tag(b"open{only"), None);
    }
}
