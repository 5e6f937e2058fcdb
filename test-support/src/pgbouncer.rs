//! A private PgBouncer in session mode, for the outbox source behind a
//! pooler.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::Instant;

use crate::free_port;
use crate::postgres::{chown_to_postgres, pg_command, Postgres};

/// A private PgBouncer in session mode in front of a [`Postgres`].
pub struct PgBouncer {
    dir: TempDir,
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
}

impl PgBouncer {
    /// Starts PgBouncer (session pooling, trust auth) for `pg`.
    pub async fn start(pg: &Postgres) -> PgBouncer {
        let dir = tempfile::Builder::new()
            .prefix("pgci-bouncer-")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        std::fs::write(dir.path().join("userlist.txt"), "\"postgres\" \"\"\n").expect("userlist");
        std::fs::write(
            dir.path().join("pgbouncer.ini"),
            format!(
                "[databases]\npostgres = host=127.0.0.1 port={} dbname=postgres\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {}\npool_mode = session\n\
                 ignore_startup_parameters = extra_float_digits\n",
                pg.port,
                dir.path().join("userlist.txt").display()
            ),
        )
        .expect("ini");
        chown_to_postgres(dir.path());
        let log = std::fs::File::create(dir.path().join("pgbouncer.log")).expect("log");
        let child = pg_command(Path::new("/usr/sbin/pgbouncer"))
            .arg(dir.path().join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start pgbouncer (is the pgbouncer package installed?)");
        let bouncer = PgBouncer {
            dir,
            port,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let conninfo = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
        while tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "pgbouncer did not start: {}",
                bouncer.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bouncer
    }

    /// The URL through the pooler.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
