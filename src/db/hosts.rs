//! Several hosts in `postgres.url`, libpq's form
//! `postgres://u@a:5432,b:5432/db?target_session_attrs=read-write`: which
//! one to talk to.
//!
//! Every connection, regular or replication, goes to the writable primary:
//! the slot (unless `replication.url` puts it on a standby, see
//! [`crate::db::ConnInfo::slot_server`]), the publication and the
//! heartbeats live there. The hosts are
//! tried in the order written each time a connection opens, so after a
//! promotion the next connection finds the new primary. tokio-postgres can
//! try several hosts itself but does not say which one answered, and the
//! replication connection (another client) must reach the same server; so
//! the choice is made here, host by host ([`crate::db::Db::connect`],
//! [`crate::db::ConnInfo::primary`]).

use std::fmt;

use tokio_postgres::config::{Host, TargetSessionAttrs};

/// One host and port of the URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name, IP address, or a Unix socket directory (starts with `/`).
    pub host: String,
    /// TCP port (also names the Unix socket file).
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The hosts of a parsed URL, in order, and whether the session must
/// accept writes; or why they cannot be used.
pub(crate) fn endpoints(config: &tokio_postgres::Config) -> Result<(Vec<Endpoint>, bool), String> {
    let hosts: Vec<String> = match config.get_hosts() {
        [] => vec!["localhost".to_string()],
        hosts => hosts
            .iter()
            .map(|host| match host {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            })
            .collect(),
    };
    let ports: Vec<u16> = match config.get_ports() {
        [] => vec![5432; hosts.len()],
        [one] => vec![*one; hosts.len()],
        ports if ports.len() == hosts.len() => ports.to_vec(),
        ports => {
            return Err(format!(
                "{} hosts and {} ports: give one port for all hosts or one per host",
                hosts.len(),
                ports.len()
            ))
        }
    };
    let read_write = match config.get_target_session_attrs() {
        TargetSessionAttrs::ReadWrite => true,
        TargetSessionAttrs::Any => false,
        _ => {
            return Err(
                "target_session_attrs=read-only: the slot, the publication and the heartbeats live on the primary; use read-write"
                    .to_string(),
            )
        }
    };
    if hosts.len() > 1 && !read_write {
        return Err(
            "several hosts need target_session_attrs=read-write, so that the daemon always reaches the primary (the slot lives there)"
                .to_string(),
        );
    }
    let endpoints = hosts
        .into_iter()
        .zip(ports)
        .map(|(host, port)| Endpoint { host, port })
        .collect();
    Ok((endpoints, read_write))
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn parse(url: &str) -> Result<(Vec<Endpoint>, bool), String> {
        endpoints(&tokio_postgres::Config::from_str(url).expect("driver parses it"))
    }

    #[test]
    fn several_hosts_with_their_ports_or_one_for_all() {
        let (hosts, read_write) =
            parse("postgres://u@a:5433,b:5434/db?target_session_attrs=read-write").expect("ok");
        assert!(read_write);
        let shown: Vec<String> = hosts.iter().map(Endpoint::to_string).collect();
        assert_eq!(shown, ["a:5433", "b:5434"]);
        let (hosts, _) = parse("postgres://u@a,b/db?target_session_attrs=read-write").expect("ok");
        assert!(hosts.iter().all(|e| e.port == 5432), "{hosts:?}");
        let (hosts, read_write) = parse("postgres://u@a:6000/db").expect("ok");
        assert_eq!(
            hosts,
            [Endpoint {
                host: "a".into(),
                port: 6000
            }]
        );
        assert!(!read_write);
    }

    #[test]
    fn several_hosts_must_ask_for_the_primary() {
        let err = parse("postgres://u@a:1,b:2/db").unwrap_err();
        assert!(err.contains("target_session_attrs=read-write"), "{err}");
        let err = parse("postgres://u@a/db?target_session_attrs=read-only").unwrap_err();
        assert!(err.contains("use read-write"), "{err}");
    }
}
