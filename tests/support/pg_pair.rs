//! A PostgreSQL 18 primary and physical standby of our own (deploy/local/pg-pair.sh), set up
//! for failover slots, that a test may kill and promote. Destroyed on drop.

use std::path::PathBuf;
use std::process::Command;

use super::{free_port, repo, unique};

pub struct PgPair {
    dir: PathBuf,
    pub primary_port: u16,
    pub standby_port: u16,
}

impl PgPair {
    /// initdb, roles, physical slot, base backup, both started, the standby streaming.
    pub fn create() -> PgPair {
        let dir = std::env::temp_dir().join(unique("pair"));
        let (primary_port, standby_port) = (free_port(), free_port());
        let pair = PgPair { dir, primary_port, standby_port };
        pair.run(&["create", &pair.dir.display().to_string(), &primary_port.to_string(), &standby_port.to_string()]);
        pair
    }

    fn run(&self, args: &[&str]) {
        let out =
            Command::new("bash").arg(repo().join("deploy/local/pg-pair.sh")).args(args).output().expect("pg-pair.sh");
        assert!(
            out.status.success(),
            "pg-pair.sh {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn dir(&self) -> String {
        self.dir.display().to_string()
    }

    /// Superuser URL of a node, database polysync.
    pub fn url(port: u16) -> String {
        format!("postgres://postgres:postgres@127.0.0.1:{port}/polysync")
    }

    pub fn primary_url(&self) -> String {
        Self::url(self.primary_port)
    }

    pub fn standby_url(&self) -> String {
        Self::url(self.standby_port)
    }

    /// kill -9 of the primary's postmaster and every backend: a crash, nothing flushed on the way.
    pub fn kill_primary(&self) {
        self.run(&["kill-primary", &self.dir()]);
    }

    /// A clean shutdown of the primary (a planned switchover).
    pub fn stop_primary(&self) {
        self.run(&["stop-primary", &self.dir()]);
    }

    /// Promote the standby and wait until it takes writes.
    pub fn promote(&self) {
        self.run(&["promote", &self.dir()]);
    }
}

impl Drop for PgPair {
    fn drop(&mut self) {
        let _ =
            Command::new("bash").arg(repo().join("deploy/local/pg-pair.sh")).args(["destroy", &self.dir()]).output();
    }
}
