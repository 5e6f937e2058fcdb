//! Throw-away certificates (made with `openssl`) for the TLS tests.

use std::path::PathBuf;
use std::process::Command;

use tempfile::TempDir;

/// A test certificate authority and a server certificate it signed for
/// `DNS:localhost` (not for the IP address, so host-name checks can fail).
pub struct Certs {
    dir: TempDir,
}

impl Certs {
    /// Generates a CA, a server key and certificate, and an unrelated CA.
    pub fn generate() -> Certs {
        let dir = tempfile::Builder::new()
            .prefix("pgci-certs-")
            .tempdir()
            .expect("tempdir");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for ca in ["ca", "other-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-subj",
                &format!("/CN=pgci test {ca}"),
            ]);
        }
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(dir.path().join("san.ext"), "subjectAltName=DNS:localhost\n").expect("ext");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.pem",
            "-extfile",
            "san.ext",
        ]);
        Certs { dir }
    }

    /// A file of the set: `ca.pem`, `other-ca.pem`, `server.pem`, `server.key`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}
