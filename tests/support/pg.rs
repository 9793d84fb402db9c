//! A throw-away database on the test PostgreSQL server.

use tokio_postgres::{Client, NoTls};

/// Admin URL of the test server (`make peers` exports `POLYSYNC_TEST_PG`).
pub fn admin_url() -> String {
    std::env::var("POLYSYNC_TEST_PG").unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:55432/postgres".into())
}

/// Admin URL of the PostgreSQL 18 test server (`make peers` exports `POLYSYNC_TEST_PG18`);
/// the version matrix runs on it as well as on the default server.
pub fn admin_url_18() -> String {
    std::env::var("POLYSYNC_TEST_PG18").expect("POLYSYNC_TEST_PG18 (make peers starts PostgreSQL 18 and exports it)")
}

fn with_db(url: &str, db: &str) -> String {
    let mut u = url::Url::parse(url).expect("pg url");
    u.set_path(db);
    u.to_string()
}

/// Connect to a URL (no TLS; the test server is on loopback).
pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A database created for one test, dropped (with its slots) by [`TestDb::cleanup`].
pub struct TestDb {
    pub admin: String,
    pub name: String,
    pub url: String,
    pub client: Client,
}

impl TestDb {
    pub async fn create(prefix: &str) -> TestDb {
        TestDb::create_on(&admin_url(), prefix).await
    }

    /// A database on the server of `admin` (an admin URL).
    pub async fn create_on(admin: &str, prefix: &str) -> TestDb {
        let name = super::unique(prefix).to_lowercase();
        let client = connect(admin).await;
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create database");
        let url = with_db(admin, &name);
        let client = connect(&url).await;
        TestDb { admin: admin.to_string(), name, url, client }
    }

    /// `server_version_num` of the server.
    pub async fn server_version(&self) -> u32 {
        let v: String = self.client.query_one("SHOW server_version_num", &[]).await.unwrap().get(0);
        v.parse().unwrap()
    }

    pub async fn exec(&self, sql: &str) {
        self.client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// Current WAL position.
    pub async fn current_lsn(&self) -> u64 {
        let s: String = self.client.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap().get(0);
        s.parse::<polysync::change::Lsn>().unwrap().0
    }

    /// The slot's confirmed_flush_lsn (0 if the slot does not exist).
    pub async fn confirmed(&self, slot: &str) -> u64 {
        let row = self
            .client
            .query_opt("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .unwrap();
        match row.and_then(|r| r.get::<_, Option<String>>(0)) {
            Some(s) => s.parse::<polysync::change::Lsn>().unwrap().0,
            None => 0,
        }
    }

    /// Wait until the slot has confirmed everything written so far.
    /// Wait until a walsender streams from `slot` and the slot's creation has finished.
    ///
    /// `pg_replication_slots.active` alone is not enough: while `pg_create_logical_replication_slot`
    /// runs, the creating backend holds the slot (active), and creation waits for every running
    /// transaction of the cluster to end. A change committed in that time precedes the slot's
    /// consistent point and is never decoded; under parallel tests with long transactions this
    /// made a test's first writes vanish. A walsender (listed in `pg_stat_replication`) holding a
    /// slot with a `confirmed_flush_lsn` means creation is over and the daemon is streaming.
    pub async fn wait_streaming(&self, slot: &str) {
        let timeout = std::time::Duration::from_secs(90);
        super::wait_for(&format!("a walsender streaming from slot {slot}"), timeout, || async {
            self.client
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
                     WHERE s.slot_name = $1 AND s.confirmed_flush_lsn IS NOT NULL",
                    &[&slot],
                )
                .await
                .unwrap()
                .is_some()
        })
        .await;
    }

    pub async fn wait_caught_up(&self, slot: &str, timeout: std::time::Duration) {
        let target = self.current_lsn().await;
        super::wait_for(&format!("slot {slot} to confirm {}", polysync::change::Lsn(target)), timeout, || async {
            self.confirmed(slot).await >= target
        })
        .await;
    }

    /// Drop slots of this database, then the database.
    pub async fn cleanup(self) {
        let admin = connect(&self.admin).await;
        for _ in 0..50 {
            let r = admin
                .batch_execute(&format!(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = '{0}' AND active_pid IS NOT NULL; \
                     SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{0}' AND NOT active;",
                    self.name
                ))
                .await;
            let left: i64 = admin
                .query_one("SELECT count(*) FROM pg_replication_slots WHERE database = $1", &[&self.name])
                .await
                .unwrap()
                .get(0);
            if r.is_ok() && left == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        drop(self.client);
        let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).await;
    }
}
