use super::*;

fn parse(toml: &str) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.toml");
    std::fs::write(&path, toml).expect("write");
    Config::load(&path)
}

/// A syntax error on a line holding a password says where and what,
/// on one line, without quoting the line.
#[test]
fn a_syntax_error_does_not_quote_the_line() {
    let Err(ConfigError::Load(text)) =
        parse("[postgres]\nurl = \"postgres://pgci:S3cretPW@127.0.0.1/db\n")
    else {
        panic!("loaded");
    };
    assert!(!text.contains("S3cretPW"), "{text}");
    assert!(!text.contains('\n'), "{text}");
    assert!(text.contains("line 2"), "{text}");
    assert!(text.contains("expected"), "{text}");
}

const MINIMAL: &str = r#"
    [postgres]
    url = "postgres://u@127.0.0.1/db"
    [redis]
    url = "redis://127.0.0.1"
    [[rules]]
    table = "public.profiles"
    keys = ["profile:user:{id}"]
"#;

#[test]
fn a_group_narrows_the_file_to_its_slot_publication_and_rules() {
    let text = format!(
        "{MINIMAL}
        [[rules]]
        table = \"user_tokens\"
        keys = [\"balance:{{user_id}}\"]
        [[groups]]
        name = \"balances\"
        tables = [\"public.user_tokens\"]
        listen = \"127.0.0.1:9300\"
        [[groups]]
        name = \"rest\"
        tables = [\"profiles\"]
        slot = \"rest_slot\"
        "
    );
    let cfg = parse(&text).expect("loads");
    let balances = cfg.for_group("balances").expect("group");
    assert_eq!(balances.replication.slot, "pg_cache_invalidator_balances");
    assert_eq!(
        balances.replication.publication,
        "pg_cache_invalidator_balances"
    );
    assert_eq!(
        balances.replication.application_name,
        "pg-cache-invalidator-balances"
    );
    assert_eq!(balances.http.listen, "127.0.0.1:9300");
    assert_eq!(balances.rules.len(), 1);
    assert_eq!(balances.rules[0].table.to_string(), "public.user_tokens");
    assert!(balances.groups.is_empty());
    assert_eq!(balances.group.as_deref(), Some("balances"));
    let rest = cfg.for_group("rest").expect("group");
    assert_eq!(
        (
            rest.replication.slot.as_str(),
            rest.replication.publication.as_str()
        ),
        ("rest_slot", "rest_slot")
    );
    assert_eq!(rest.http.listen, DEFAULT_HTTP_LISTEN);
    assert_eq!(cfg.each_group().len(), 2);
    let Err(ConfigError::Invalid(lines)) = cfg.for_group("nope") else {
        panic!("an unknown group is an error")
    };
    assert!(lines[0].contains("balances, rest"), "{lines:?}");
    assert_eq!(parse(MINIMAL).expect("loads").each_group().len(), 1);
}

/// A schema name that would break out of the SQL `setup` writes (a
/// `$fn$` ends the trigger function's body) is refused before setup
/// creates anything.
#[test]
fn an_outbox_schema_that_is_not_a_plain_name_is_refused() {
    for bad in ["a$fn$b", "x;drop", "1abc", "a b", "sch\"ema"] {
        let text = format!("{MINIMAL}\n[outbox]\nschema = {bad:?}\n");
        let Err(ConfigError::Invalid(lines)) = parse(&text).expect("loads").validate() else {
            panic!("{bad} accepted")
        };
        assert!(
            lines.iter().any(|l| l.starts_with("outbox.schema:")),
            "{lines:?}"
        );
    }
    for good in ["cache_invalidator", "Cache_2", "_x"] {
        let text = format!("{MINIMAL}\n[outbox]\nschema = {good:?}\n");
        parse(&text).expect("loads").validate().expect(good);
    }
}

#[test]
fn group_mistakes_name_their_field() {
    let text = format!(
        "{MINIMAL}
        [[groups]]
        name = \"Bad-Name\"
        tables = [\"public.profiles\"]
        listen = \"nowhere\"
        [[groups]]
        name = \"b\"
        tables = []
        slot = \"pg_cache_invalidator_Bad-Name\"
        "
    );
    let Err(ConfigError::Invalid(lines)) = parse(&text).expect("loads").validate() else {
        panic!("mistakes are errors")
    };
    let all = lines.join("\n");
    for expected in [
        "groups[0].name: \"Bad-Name\" must be lower-case",
        "groups[0].listen: \"nowhere\"",
        "groups[1].tables: empty",
        "groups[1].slot: \"pg_cache_invalidator_Bad-Name\" is another group's slot",
    ] {
        assert!(all.contains(expected), "{expected}: {all}");
    }
    let outbox = format!(
        "{}\n[[groups]]\nname = \"a\"\ntables = [\"public.profiles\"]\n",
        MINIMAL.replace("[redis]", "source = \"outbox\"\n[redis]")
    );
    let Err(ConfigError::Invalid(lines)) = parse(&outbox).expect("loads").validate() else {
        panic!("groups with the outbox are an error")
    };
    assert!(lines.iter().any(|l| l.starts_with("groups: ")), "{lines:?}");
}

#[test]
fn loads_defaults() {
    let cfg = parse(MINIMAL).expect("loads");
    assert_eq!(cfg.replication.slot, "pg_cache_invalidator");
    assert_eq!(cfg.redis.channel, "cache-invalidation");
    assert!(cfg.validate().is_ok());
}

#[test]
fn unknown_key_is_an_error_naming_it() {
    let err = parse(&format!("{MINIMAL}\n[log]\nformt = \"json\"\n")).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("formt"), "{text}");
    assert_eq!(text.lines().count(), 1);
}

#[test]
fn validation_names_each_field() {
    let cfg = parse(
        r#"
        [postgres]
        url = "mysql://x"
        [replication]
        slot = "Bad-Slot"
        [redis]
        url = "redis://127.0.0.1"
        [[rules]]
        table = "public.profiles"
        keys = ["{id}"]
    "#,
    )
    .expect("loads");
    let text = cfg.validate().unwrap_err().to_string();
    assert!(text.contains("postgres.url"), "{text}");
    assert!(text.contains("replication.slot"), "{text}");
}

/// A table name that is not one fails when the file is read, naming the
/// field, so nothing later re-checks it.
#[test]
fn a_bad_table_name_fails_when_the_file_is_read() {
    let Err(ConfigError::Load(text)) = parse(
        "[postgres]\nurl = \"postgres://u@h/db\"\n[redis]\nurl = \"redis://h\"\n[[rules]]\ntable = \"a.b.c\"\nkeys = [\"k:{id}\"]\n",
    ) else {
        panic!("loaded");
    };
    assert!(text.contains("\"a.b.c\" is not a table name"), "{text}");
    assert!(text.contains("rules"), "{text}");
}

#[test]
fn a_typo_in_a_named_value_lists_the_valid_ones_and_names_the_field() {
    let Err(ConfigError::Load(text)) = parse(
        "[postgres]\nurl = \"postgres://u@h/db\"\n[redis]\nurl = \"redis://h\"\n[[rules]]\ntable = \"t\"\nkeys = [\"k:{id}\"]\naction = \"invalidate\"\n",
    ) else {
        panic!("loaded");
    };
    assert!(
        text.contains("action \"invalidate\" is not one of: delete, refresh"),
        "{text}"
    );
    assert!(text.contains("`rules[0].action`"), "{text}");
    let Err(ConfigError::Load(text)) = parse(
        "[postgres]\nurl = \"postgres://u@h/db\"\nsource = \"replicaton\"\n[redis]\nurl = \"redis://h\"\n[[rules]]\ntable = \"t\"\nkeys = [\"k:{id}\"]\n",
    ) else {
        panic!("loaded");
    };
    assert!(
        text.contains("is not one of: replication, outbox"),
        "{text}"
    );
    let loaded = parse(
        "[postgres]\nurl = \"postgres://u@h/db\"\nsource = \"outbox\"\n[redis]\nurl = \"redis://h\"\n[[rules]]\ntable = \"t\"\nkeys = [\"k:{id}\"]\naction = \"refresh\"\n",
    );
    assert!(loaded.is_ok(), "{:?}", loaded.err());
}

/// `replication.url` is a PostgreSQL URL, and only for the replication
/// source; its password is never printed.
#[test]
fn a_slot_server_url_is_checked_like_the_primarys() {
    let standby = "\n[replication]\nurl = \"postgres://cache:pw@replica:5432/app\"\n";
    parse(&format!("{MINIMAL}{standby}"))
        .expect("loads")
        .validate()
        .expect("valid");
    let outbox = MINIMAL.replace("[postgres]\n", "[postgres]\n    source = \"outbox\"\n");
    for (text, expected) in [
        (
            format!("{MINIMAL}\n[replication]\nurl = \"redis://cache:pw@replica\"\n"),
            "replication.url: redis://cache:***@replica is not a postgres:// URL",
        ),
        (
            format!("{outbox}{standby}"),
            "replication.url: the outbox source has no slot",
        ),
    ] {
        let Err(ConfigError::Invalid(lines)) = parse(&text).expect("loads").validate() else {
            panic!("{text} accepted")
        };
        assert!(lines.iter().any(|l| l.starts_with(expected)), "{lines:?}");
        assert!(!lines.concat().contains(":pw@"), "{lines:?}");
    }
}

/// A stream needs events on, a bound, and on a cluster the channel's hash
/// slot (its script updates the sequence record and the stream together);
/// the message names a stream that would do.
#[test]
fn the_event_stream_is_checked_where_it_can_fail() {
    let with = |redis_extra: &str| {
        let text = MINIMAL.replace(
            "url = \"redis://127.0.0.1\"",
            &format!("url = \"redis://127.0.0.1\"\n{redis_extra}"),
        );
        match parse(&text).expect("loads").validate() {
            Ok(()) => Vec::new(),
            Err(ConfigError::Invalid(lines)) => lines,
            Err(other) => panic!("{other}"),
        }
    };
    assert!(with("stream = \"events\"").is_empty());
    assert!(with("cluster = true\nstream = \"{cache-invalidation}:events\"").is_empty());
    let lines = with("cluster = true\nstream = \"events\"");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("redis.stream") && l.contains("\"{cache-invalidation}:events\"")),
        "{lines:?}"
    );
    let lines = with("channel = \"\"\nstream = \"events\"");
    assert!(
        lines.iter().any(|l| l.contains("events are off")),
        "{lines:?}"
    );
    let lines = with("stream = \"events\"\nstream_max_len = 0");
    assert!(
        lines.iter().any(|l| l.contains("redis.stream_max_len")),
        "{lines:?}"
    );
    let lines = with("cluster = true\nchannel = \"a}b\"");
    assert!(
        lines.iter().any(|l| l.contains("redis.channel")),
        "{lines:?}"
    );
}
