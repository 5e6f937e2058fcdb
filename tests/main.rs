//! Integration tests against a real PostgreSQL and redis-server, both
//! started by the harness in `support/` on free loopback ports.

mod support;

mod cli;
mod clients;
mod cluster;
mod consistency;
mod deploy;
mod events;
mod failover;
mod faults;
mod groups;
mod invalidation;
mod l1;
mod nextjs;
mod operations;
mod outbox;
mod redis_health;
mod refresh;
mod status_page;
mod sync;
mod targets;
mod tls;
mod verbs;
mod verify;
mod wal;
