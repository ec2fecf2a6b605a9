//! PostgreSQL's history (system identifier and timeline) as the fleet records it: after a
//! failover every instance meets the new timeline at the same moment.
use std::sync::Arc;

use futures::future::join_all;
use secrecy::ExposeSecret;
use sqlx::Connection;

use crate::helpers::{Mode, spawn_with, test_settings};

/// Eight instances record a history nobody recorded yet, at once: each learns it (none fails —
/// a statement that lost the race to insert the row once found no first-seen time and answered
/// INTERNAL, as a DisableUser did in the fault run right after a failover), and the history is
/// recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_meeting_a_new_history_at_once_all_record_it() {
    let app = spawn_with(test_settings(Mode::NoRedis)).await;
    let metrics = authd::metrics::Metrics::new();
    let mut sql = sqlx::PgConnection::connect(app.settings.database.url.expose_secret())
        .await
        .unwrap();
    for round in 0..5 {
        // Forgotten: the next look records it anew, from every instance at once.
        sqlx::query("delete from database_timelines")
            .execute(&mut sql)
            .await
            .unwrap();
        let instances = join_all(
            (0..8).map(|_| authd::store::Db::connect(&app.settings.database, metrics.clone())),
        )
        .await;
        let instances: Vec<Arc<authd::store::Db>> = instances
            .into_iter()
            .map(|db| Arc::new(db.unwrap()))
            .collect();
        let looked = join_all(instances.iter().map(|db| {
            let db = db.clone();
            tokio::spawn(async move { db.check_history().await })
        }))
        .await;
        for (i, result) in looked.into_iter().enumerate() {
            if let Err(error) = result.unwrap() {
                panic!("round {round}, instance {i}: {error}");
            }
        }
        let recorded: i64 = sqlx::query_scalar("select count(*) from database_timelines")
            .fetch_one(&mut sql)
            .await
            .unwrap();
        assert_eq!(recorded, 1, "round {round}");
        for db in instances {
            db.close().await;
        }
    }
}
