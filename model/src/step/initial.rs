//! The state every run starts from.
use super::*;

/// The initial state: a warm fleet before the change — every instance has established its
/// generation and completed a follower pass, every instance with the cache holds a lease.
pub(crate) fn initial(p: &Protocol) -> State {
    let cfg = &p.cfg;
    let nodes = cfg
        .nodes
        .iter()
        .enumerate()
        .map(|(i, node)| Instance {
            paused: false,
            pg_link: true,
            redis_link: true,
            generation: if node.redis { 8 + 1 } else { 0 },
            trusted_for: if node.redis { cfg.bound } else { 0 },
            position_age: (node.redis && cfg.bugs.retry_from_position).then_some(0),
            applied: (0, 0),
            followed: 0,
            pending: false,
            copy: (cfg.warm_copies && node.local).then_some(0),
            belief_for: if node.local { cfg.lease_of(i) - 1 } else { 0 },
            hearing: true,
            lost: false,
            held_age: node.local.then_some(0),
            seen: 0,
            timeline: 1,
            read: None,
        })
        .collect();
    let subscribers: Vec<Subscriber> = cfg
        .subscriber
        .iter()
        .map(|_| Subscriber {
            connected: true,
            primed: true,
            copy: cfg.warm_copies.then_some(0),
            belief_for: cfg.lease - 1,
            fresh_for: cfg.bound,
            heard: Some(0),
            seen: 0,
            from: 0,
            event: None,
            granted: None,
            ack: None,
            relay: None,
            fetch: None,
        })
        .collect();
    let subscriber_leases = subscribers.iter().map(|_| {
        Some(LeaseRow {
            end_in: cfg.lease,
            applied_age: 0,
        })
    });
    let pg = Pg {
        version: 0,
        revoked_age: None,
        leases: (0..cfg.nodes.len())
            .map(|i| {
                cfg.nodes[i].local.then(|| LeaseRow {
                    end_in: cfg.lease_of(i),
                    applied_age: 0,
                })
            })
            .chain(subscriber_leases)
            .collect(),
        timeline: 1,
        timeline_seen_age: None,
    };
    State {
        faults_left: cfg.fault_budget,
        reads_left: cfg.reads,
        pg,
        redis: crate::state::Redis {
            slot: if cfg.warm_copies {
                Slot::Copy {
                    version: 0,
                    generation: 9,
                }
            } else {
                Slot::Empty
            },
            identity: 1,
            unreplicated: None,
        },
        wire: Vec::new(),
        nodes,
        call: crate::state::Call {
            attempts: 0,
            stage: Stage::Idle,
            node: 0,
            deadline_in: 0,
            version: 0,
            committed_age: 0,
            redis_confirmed: false,
            ok: None,
            acked: 0,
            cancelled: false,
        },
        subscribers,
        sub_reads_left: cfg.subscriber_reads,
        legacy: None,
        lost_commit: false,
        violation: None,
    }
}
