//! The fleet's lease length, agreed at startup.
use super::*;

/// The lease length this instance holds and waits for: the fleet's (see
/// `store::LeaseRepo::fleet_lease`). Every instance may wait for a holder's lease, its own cache
/// on or off, so its request timeout must leave room for it; and this instance is recorded as
/// running, so that no instance starting later sets a length it could not wait for.
pub(super) async fn fleet_lease(
    settings: &Settings,
    db: &Db,
    redis: bool,
    instance: uuid::Uuid,
) -> anyhow::Result<Duration> {
    let configured = settings.local_cache.lease;
    // Strict subscribers of the event stream hold leases too (taken by this instance).
    let holds = (settings.local_cache.enabled && redis) || settings.events.served();
    let mine = holds.then_some(configured);
    let timeout = settings.grpc.request_timeout;
    let covers = crate::clock::covers(timeout);
    let mut fleet = db
        .leases()
        .fleet_lease(instance, mine, covers, false)
        .await
        .context("cannot read the fleet's lease from PostgreSQL")?;
    if let Some(pause) = fleet.and_then(|f| f.confirm_after) {
        tracing::warn!(
            ?pause,
            "LOCAL_CACHE__LEASE would replace the fleet's lease, but instances that held leases \
             lately were not seen for a while (stopped, or PostgreSQL out of their reach): \
             waiting to see whether they still run"
        );
        tokio::time::sleep(pause).await;
        fleet = db
            .leases()
            .fleet_lease(instance, mine, covers, true)
            .await
            .context("cannot read the fleet's lease from PostgreSQL")?;
    }
    let Some(fleet) = fleet else {
        // No instance ever had the cache on: nobody to wait for.
        return Ok(configured);
    };
    if let Some(covered) = fleet.uncovered {
        return Err(crate::config::ConfigError::invalid(
            "LOCAL_CACHE__LEASE",
            format!(
                "must be at most {covered:?} while instances run whose GRPC__REQUEST_TIMEOUT \
                 cannot wait for a longer lease (their revoking calls wait for every holder's \
                 lease); raise their timeout first, or stop them"
            ),
        )
        .into());
    }
    if !(Duration::from_millis(500)..=crate::local::LONGEST_LEASE).contains(&fleet.lease) {
        return Err(crate::config::ConfigError::invalid(
            "LOCAL_CACHE__LEASE",
            format!(
                "the fleet's lease in local_cache_fleet is {:?}, outside 500ms to 60s (edited \
                 by hand?)",
                fleet.lease
            ),
        )
        .into());
    }
    if fleet.adopted {
        tracing::warn!(
            configured = ?configured,
            fleet = ?fleet.lease,
            "LOCAL_CACHE__LEASE differs from the lease the fleet holds; using the fleet's (it \
             changes once no instance holding leases runs, e.g. once the whole fleet restarted)"
        );
    }
    if fleet.lease > crate::clock::covers(timeout) {
        let longest = crate::clock::lease_wait(fleet.lease) + crate::clock::WAIT_SLACK;
        return Err(crate::config::ConfigError::invalid(
            "GRPC__REQUEST_TIMEOUT",
            format!(
                "must be more than {longest:?}: a revoking call may wait for a lease of the \
                 fleet's {:?} (plus 1% and 100ms) and needs a second more",
                fleet.lease
            ),
        )
        .into());
    }
    Ok(fleet.lease)
}
