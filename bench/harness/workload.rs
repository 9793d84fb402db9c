//! The e-commerce workload: schema, slots created before the changes (so every tool drains an
//! identical backlog), the backlog itself, and slot positions.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

/// Connect (plain TCP on loopback).
pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// `url` with another database name.
pub fn with_db(url: &str, db: &str) -> String {
    match url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => url.to_string(),
    }
}

/// Tables of the workload (products, orders, order_items) and the publication.
pub const SCHEMA: &str = "
CREATE TABLE products (id bigint PRIMARY KEY, sku text NOT NULL, name text NOT NULL, price numeric(12,2) NOT NULL, stock int NOT NULL);
CREATE TABLE orders (id bigint PRIMARY KEY, user_id bigint NOT NULL, region text NOT NULL, total numeric(12,2) NOT NULL, status text NOT NULL);
CREATE TABLE order_items (order_id bigint NOT NULL, product_id bigint NOT NULL, user_id bigint NOT NULL, qty int NOT NULL, PRIMARY KEY (order_id, product_id));
CREATE TABLE lat (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE big (id bigint PRIMARY KEY, payload text NOT NULL);
CREATE TABLE lat_done (id int PRIMARY KEY);
CREATE PUBLICATION bench_pub FOR TABLE products, orders, order_items, lat, lat_done, big;
";

/// A fresh database with the schema.
pub async fn fresh_db(admin_url: &str, name: &str) -> (String, Client) {
    let admin = connect(admin_url).await;
    drop_db(&admin, name).await;
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create database");
    let url = with_db(admin_url, name);
    let c = connect(&url).await;
    c.batch_execute(SCHEMA).await.expect("schema");
    (url, c)
}

/// Drop a database and its slots.
pub async fn drop_db(admin: &Client, name: &str) {
    let _ = admin
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = '{name}' AND active_pid IS NOT NULL; \
             SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{name}' AND NOT active;"
        ))
        .await;
    let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
}

/// Create a pgoutput slot.
pub async fn create_slot(c: &Client, slot: &str) {
    c.batch_execute(&format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")).await.expect("slot");
}

/// Current WAL insert position.
pub async fn current_lsn(c: &Client) -> u64 {
    let s: String = c.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap().get(0);
    parse_lsn(&s)
}

/// `X/Y` → u64.
pub fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap_or(("0", "0"));
    (u64::from_str_radix(hi, 16).unwrap_or(0) << 32) | u64::from_str_radix(lo, 16).unwrap_or(0)
}

/// `u64` → `X/Y`.
pub fn fmt_lsn(l: u64) -> String {
    format!("{:X}/{:X}", l >> 32, l & 0xffff_ffff)
}

/// A slot's confirmed_flush_lsn.
pub async fn confirmed(c: &Client, slot: &str) -> u64 {
    let r = c
        .query_opt("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .unwrap();
    r.and_then(|r| r.get::<_, Option<String>>(0)).map(|s| parse_lsn(&s)).unwrap_or(0)
}

/// Wait until the slot confirms `target`; the time it took from `start`.
pub async fn wait_confirmed(
    c: &Client,
    slot: &str,
    target: u64,
    start: Instant,
    timeout: Duration,
) -> Option<Duration> {
    loop {
        if confirmed(c, slot).await >= target {
            return Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Exactly `n` row changes: 40 % product inserts, 10 % order inserts, 10 % order-item inserts,
/// 25 % product updates, 15 % deletes (order items, then products), in transactions of at most
/// 50,000 rows. Returns the count written.
pub async fn backlog(c: &Client, n: u64) -> u64 {
    let products = n * 40 / 100;
    let orders = n * 10 / 100;
    let items = n * 10 / 100;
    let updates = n * 25 / 100;
    let item_deletes = items / 2;
    let product_deletes = n - products - orders - items - updates - item_deletes;
    let step = 50_000u64;
    let mut done = 0;
    let chunked = |from: u64, to: u64| {
        let mut out = Vec::new();
        let mut a = from;
        while a < to {
            out.push((a, (a + step).min(to)));
            a += step;
        }
        out
    };
    for (a, b) in chunked(0, products) {
        c.batch_execute(&format!(
            "INSERT INTO products SELECT i, 'SKU-' || i, 'Product ' || i, (i % 1000) + 0.99, 100 FROM generate_series({}, {}) i",
            a + 1,
            b
        ))
        .await
        .unwrap();
    }
    done += products;
    for (a, b) in chunked(0, orders) {
        c.batch_execute(&format!(
            "INSERT INTO orders SELECT i, i % 5000, CASE WHEN i % 3 = 0 THEN 'us-east-1' ELSE 'eu-west-1' END, (i % 500) + 0.5, 'placed' FROM generate_series({}, {}) i",
            a + 1,
            b
        ))
        .await
        .unwrap();
    }
    done += orders;
    for (a, b) in chunked(0, items) {
        c.batch_execute(&format!(
            "INSERT INTO order_items SELECT (i % {orders}) + 1, i, (i % 5000), 1 + i % 3 FROM generate_series({}, {}) i",
            a + 1,
            b
        ))
        .await
        .unwrap();
    }
    done += items;
    for (a, b) in chunked(0, updates) {
        let (a, b) = (a % products, (b - 1) % products + 1);
        c.batch_execute(&format!(
            "UPDATE products SET stock = stock - 1, price = price + 1 WHERE id > {a} AND id <= {b}"
        ))
        .await
        .unwrap();
    }
    done += updates;
    for (a, b) in chunked(0, item_deletes) {
        c.batch_execute(&format!("DELETE FROM order_items WHERE product_id > {a} AND product_id <= {b}"))
            .await
            .unwrap();
    }
    done += item_deletes;
    for (a, b) in chunked(0, product_deletes) {
        let (a, b) = (products - b, products - a);
        c.batch_execute(&format!("DELETE FROM products WHERE id > {a} AND id <= {b}")).await.unwrap();
    }
    done + product_deletes
}
