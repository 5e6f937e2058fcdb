//! Records the git commit the binary is built from (`--version`,
//! `pgci_build_info`); "unknown" outside a git checkout.

use std::process::Command;

fn main() {
    // A build without the repository (a container build; .git is not in
    // its context) is given the commit as PGCI_GIT_COMMIT.
    println!("cargo:rerun-if-env-changed=PGCI_GIT_COMMIT");
    if let Ok(commit) = std::env::var("PGCI_GIT_COMMIT") {
        if !commit.is_empty() {
            println!("cargo:rustc-env=PGCI_GIT_COMMIT={commit}");
            return;
        }
    }
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|text| text.trim().to_string())
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=PGCI_GIT_COMMIT={commit}");
    // Rebuild when HEAD moves (a commit, a checkout).
    println!("cargo:rerun-if-changed=.git/HEAD");
    if let Ok(head) = std::fs::read_to_string(".git/HEAD") {
        if let Some(reference) = head.strip_prefix("ref: ") {
            println!("cargo:rerun-if-changed=.git/{}", reference.trim());
        }
    }
    println!("cargo:rerun-if-changed=.git/packed-refs");
}
