//! Dropping a database a test or a benchmark run made for itself: the one way of doing it for the
//! integration tests and the load benchmark, which include this file.
use std::time::Duration;

/// Drops the database `url` names (connected through the server's `postgres` database),
/// terminating its connections. Bounded: a run that failed while a proxy black-holed PostgreSQL
/// must end, not hang; a database that cannot be dropped is left behind.
pub async fn drop_database(url: &str) {
    let Some((base, name)) = url.rsplit_once('/') else {
        return;
    };
    let drop = async {
        if let Ok(mut conn) =
            <sqlx::PgConnection as sqlx::Connection>::connect(&format!("{base}/postgres")).await
        {
            let sql = format!("drop database if exists \"{name}\" with (force)");
            let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), drop).await;
}
