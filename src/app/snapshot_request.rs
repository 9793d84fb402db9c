//! `polysync snapshot`: file a snapshot request with the running daemon. For a PostgreSQL
//! source it is a row in the source's signal table, read by the daemon from the stream (so a
//! request is ordered with the changes around it); for a DynamoDB source, a request file in
//! the state directory.

use super::Config;

/// Why `polysync snapshot` could not file a request.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RequestError(pub String);

/// File a snapshot request: a row in a PostgreSQL source's signal table, or a request file for
/// a DynamoDB source. Returns the source name and the request id (progress tasks are
/// `signal:<id>:<table>`).
pub async fn request(
    config: &Config,
    pipeline: &str,
    table: Option<&str>,
    filter: Option<&str>,
) -> Result<(String, String), RequestError> {
    let pipelines = super::check(config).map_err(|e| RequestError(e.to_string()))?;
    let p = pipelines
        .iter()
        .find(|p| &*p.name == pipeline)
        .ok_or_else(|| RequestError(format!("no pipeline named {pipeline:?} in {}", config.pipelines_dir.display())))?;
    let pg = match config.sources.get(&*p.source) {
        Some(crate::source::SourceConfig::Postgres(pg)) => pg,
        Some(crate::source::SourceConfig::Dynamodb(_)) => {
            // A backfill reads the whole table (a parallel Scan): there is one table, and Scan
            // takes no SQL condition.
            if table.is_some() || filter.is_some() {
                return Err(RequestError(format!(
                    "pipeline {pipeline:?} reads DynamoDB source {:?}: a backfill scans its whole table, so --table and --where do not apply",
                    p.source
                )));
            }
            let id = crate::source::dynamodb::backfill::request(&config.state_dir, &p.source, pipeline)
                .map_err(|e| RequestError(format!("cannot file the request in {}: {e}", config.state_dir.display())))?;
            return Ok((p.source.to_string(), id));
        }
        None => return Err(RequestError(format!("pipeline {pipeline:?} reads unknown source {:?}", p.source))),
    };
    if let Some(t) = table {
        let t = if t.contains('.') { t.to_string() } else { format!("public.{t}") };
        if !p.matches_relation(&t) {
            return Err(RequestError(format!("pipeline {pipeline:?} does not read {t}")));
        }
    }
    let signal = pg.signal_table().ok_or_else(|| {
        RequestError(format!("source {:?} has signal_table = \"\" (on-demand snapshots are off)", p.source))
    })?;
    let info = pg.validate(&p.source).map_err(|e| RequestError(e.to_string()))?;
    let client =
        crate::source::postgres::setup::connect_sql(&info, &p.source).await.map_err(|e| RequestError(e.to_string()))?;
    let row = client
        .query_one(
            &format!("INSERT INTO {} (pipeline, relation, filter) VALUES ($1, $2, $3) RETURNING id", crate::source::postgres::setup::quote_relation(&signal)),
            &[&pipeline, &table, &filter],
        )
        .await
        .map_err(|e| {
            RequestError(format!(
                "cannot insert into the signal table {signal}: {} (the daemon creates it with create_if_missing; otherwise: {} and add it to the publication)",
                crate::source::postgres::setup::pg_error_text(&e),
                crate::source::postgres::setup::signal_table_ddl(&signal)
            ))
        })?;
    Ok((p.source.to_string(), row.get::<_, i64>(0).to_string()))
}
