//! A model of how a follower reads a log once (`store::follow::follow_ids`), checked on its own:
//! transactions draw ids in order and commit or roll back in any order, each within the
//! in-flight allowance; a follower's passes read what appeared in its gaps, then the rows above
//! its top up to the last id drawn when the pass began, and keep a gap (an id skipped because
//! its transaction had not committed) until a pass that began once the allowance had passed
//! since the gap was seen.
//!
//! The property is what the follower's trust rests on: **a pass that completes has read every
//! row committed before it began.** Time is in ticks; a transaction lasts at most
//! [`ALLOWANCE`] ticks (the environment may not let time pass beyond that, which is the
//! assumption `store::in_flight` states).
use stateright::{Model, Property};

/// How long a transaction may stay in flight, in ticks (`store::in_flight`).
pub const ALLOWANCE: u8 = 2;

/// One drawn id's transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tx {
    /// Drawn this many ticks ago, not ended.
    InFlight(u8),
    Committed,
    RolledBack,
}

/// A gap: ids `from..=to`, kept until a pass that began at or after `until` (ticks from now).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Gap {
    pub from: u8,
    pub to: u8,
    pub until: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    Idle,
    /// Began (the last id drawn then is `high`); about to read the gaps.
    Gaps,
    /// About to read the next batch above the top.
    Above,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    /// Ids `1..=txs.len()`.
    pub txs: Vec<Tx>,
    /// Ids the follower has read (a bit each).
    pub read: u16,
    pub top: u8,
    pub gaps: Vec<Gap>,
    pub stage: Stage,
    pub high: u8,
    /// Ids committed when the current pass began (a bit each).
    pub owed: u16,
    /// A completed pass missed a row committed before it began.
    pub missed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Draw,
    Commit(u8),
    RollBack(u8),
    Tick,
    PassBegin,
    PassGaps,
    PassAbove,
}

/// The actions' homes in `src/` (checked by a test like the protocol model's).
pub fn origin(action: Action) -> Option<(&'static str, &'static str)> {
    match action {
        Action::PassBegin => Some(("src/store/outbox.rs", "highs")),
        Action::PassGaps => Some(("src/store/follow.rs", "fill")),
        Action::PassAbove => Some(("src/store/follow.rs", "extend")),
        _ => None,
    }
}

/// The reader under one configuration.
#[derive(Clone, Debug)]
pub struct Reader {
    /// Ids the transactions may draw.
    pub ids: u8,
    /// Rows per batch (`store::follow::BATCH`).
    pub batch: u8,
    /// A gap kept for no allowance (dropped by the next pass): the mistake the allowance
    /// exists for.
    pub gaps_without_allowance: bool,
}

fn bit(id: u8) -> u16 {
    1 << id
}

impl Reader {
    fn committed(s: &State) -> u16 {
        s.txs
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == Tx::Committed)
            .fold(0, |acc, (k, _)| acc | bit(k as u8 + 1))
    }

    /// The allowance a gap seen now is kept for (the code's `until`: the read's time plus the
    /// allowance, plus its clock margin).
    fn until(&self) -> u8 {
        if self.gaps_without_allowance {
            0
        } else {
            ALLOWANCE + 1
        }
    }
}

impl Model for Reader {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            txs: Vec::new(),
            read: 0,
            top: 0,
            gaps: Vec::new(),
            stage: Stage::Idle,
            high: 0,
            owed: 0,
            missed: false,
        }]
    }

    fn actions(&self, s: &State, out: &mut Vec<Action>) {
        if (s.txs.len() as u8) < self.ids {
            out.push(Action::Draw);
        }
        for (k, tx) in s.txs.iter().enumerate() {
            if matches!(tx, Tx::InFlight(_)) {
                out.push(Action::Commit(k as u8 + 1));
                out.push(Action::RollBack(k as u8 + 1));
            }
        }
        // Time passes only while no transaction would outlast the allowance.
        if s.txs
            .iter()
            .all(|t| !matches!(t, Tx::InFlight(age) if *age >= ALLOWANCE))
        {
            out.push(Action::Tick);
        }
        out.push(match s.stage {
            Stage::Idle => Action::PassBegin,
            Stage::Gaps => Action::PassGaps,
            Stage::Above => Action::PassAbove,
        });
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Draw => s.txs.push(Tx::InFlight(0)),
            Action::Commit(id) => s.txs[id as usize - 1] = Tx::Committed,
            Action::RollBack(id) => s.txs[id as usize - 1] = Tx::RolledBack,
            Action::Tick => {
                for tx in &mut s.txs {
                    if let Tx::InFlight(age) = tx {
                        *age += 1;
                    }
                }
                for gap in &mut s.gaps {
                    gap.until = gap.until.saturating_sub(1);
                }
            }
            Action::PassBegin => {
                s.high = s.txs.len() as u8;
                s.owed = Self::committed(&s);
                s.stage = Stage::Gaps;
            }
            Action::PassGaps => {
                let visible = Self::committed(&s);
                let mut gaps = Vec::new();
                for gap in &s.gaps {
                    // `Ids::fill`: found rows are read, the rest of the range stays.
                    let mut from = gap.from;
                    for id in gap.from..=gap.to {
                        if visible & bit(id) != 0 {
                            s.read |= bit(id);
                            if from < id {
                                gaps.push(Gap {
                                    to: id - 1,
                                    from,
                                    ..*gap
                                });
                            }
                            from = id + 1;
                        }
                    }
                    if from <= gap.to {
                        gaps.push(Gap { from, ..*gap });
                    }
                }
                // Kept until a pass that began after its allowance (this one began at most
                // now: a gap whose `until` is 0 had passed it when the pass began).
                gaps.retain(|g| g.until > 0);
                gaps.sort();
                s.gaps = gaps;
                s.stage = Stage::Above;
            }
            Action::PassAbove => {
                let visible = Self::committed(&s);
                if s.top >= s.high {
                    // Nothing owed above the top: the pass completes without a read.
                    if s.owed & !s.read != 0 {
                        s.missed = true;
                    }
                    s.stage = Stage::Idle;
                    return Some(s);
                }
                let rows: Vec<u8> = (s.top + 1..=s.txs.len() as u8)
                    .filter(|id| visible & bit(*id) != 0)
                    .take(self.batch as usize)
                    .collect();
                let until = self.until();
                for id in &rows {
                    // `Ids::extend`.
                    if *id > s.top + 1 {
                        s.gaps.push(Gap {
                            from: s.top + 1,
                            to: id - 1,
                            until,
                        });
                    }
                    s.top = *id;
                    s.read |= bit(*id);
                }
                s.gaps.sort();
                let full = rows.len() == self.batch as usize;
                if !full || s.top >= s.high {
                    // The pass completes: it must have read what was committed when it began.
                    if s.owed & !s.read != 0 {
                        s.missed = true;
                    }
                    s.stage = Stage::Idle;
                }
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(COMPLETE, |_, s: &State| !s.missed),
            Property::sometimes("a gap is filled", |_, s: &State| {
                s.read != 0 && s.gaps.is_empty() && s.txs.len() > 2
            }),
        ]
    }
}

/// The property.
pub const COMPLETE: &str = "a completed pass read every row committed before it began";
