//! The history of a run: every operation with its start and end (µs since the run began), the
//! instance it went to, its outcome and what it said; and every fault with its window.
use std::sync::Mutex;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    Register,
    Login,
    WrongLogin,
    Validate,
    ListSessions,
    Logout,
    RevokeSession,
    RevokeAll,
    ChangePassword,
    /// StartPasswordReset, then CompletePasswordReset (the op of the completion; retried).
    PasswordReset,
    GetProfile,
    BatchGetProfiles,
    UpdateProfile,
    DisableUser,
    EnableUser,
    AdminRevokeAll,
    /// AdminService DeleteUser (retried).
    DeleteUser,
}

#[derive(Debug, Clone, Serialize)]
pub struct Op {
    pub id: usize,
    pub kind: Kind,
    pub instance: usize,
    pub start_us: u64,
    pub end_us: u64,
    /// The gRPC code name (`Ok`, `Unauthenticated`, …), or `Transport` when no answer came.
    pub outcome: String,
    /// The user index the operation is about.
    pub user: usize,
    /// The session presented (session-authenticated calls) or created (Register, Login).
    pub session: Option<String>,
    /// Sessions a successful revocation covers (created before it started).
    pub covers: Vec<String>,
    /// Profile versions seen or written: (user index, version).
    pub versions: Vec<(usize, i64)>,
    /// The user a successful Register created.
    pub created_user: Option<String>,
    /// Answered by a caller's `authd-client` Validator following `instance`'s event stream
    /// (`strict` or `bounded`), from its memory or from that instance.
    pub local: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    pub kind: String,
    pub target: String,
    pub start_us: u64,
    pub end_us: u64,
}

impl Fault {
    /// Faults that make PostgreSQL unreachable for someone.
    pub fn on_postgres(&self) -> bool {
        self.kind.starts_with("postgres")
    }

    /// Faults that stop an authd instance (`target` starts with its index).
    pub fn stops_instance(&self) -> Option<usize> {
        self.kind
            .starts_with("authd")
            .then(|| self.target.split_whitespace().next()?.parse().ok())
            .flatten()
    }

    /// Faults on Redis (its data, reachability or speed).
    pub fn on_redis(&self) -> bool {
        self.kind.starts_with("redis")
    }
}

#[derive(Default)]
pub struct History {
    ops: Mutex<Vec<Op>>,
    faults: Mutex<Vec<Fault>>,
}

impl History {
    pub fn record(&self, mut op: Op) {
        let mut ops = self.ops.lock().unwrap();
        op.id = ops.len();
        ops.push(op);
    }

    pub fn fault(&self, fault: Fault) {
        self.faults.lock().unwrap().push(fault);
    }

    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }

    pub fn faults(&self) -> Vec<Fault> {
        self.faults.lock().unwrap().clone()
    }
}
