//! The shared state of a simulated world: collectives waiting for their
//! members, messages in flight per channel, and which ranks wait for what
//! (to wake only a rank a call lets go on, and to find a wait no rank can
//! end). It holds no strategy and no transport logic beyond matching.

use super::MessageKind;
use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// A collective call: a split of the group (with this member's color) or a message.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Call {
    Split(Option<u32>),
    Message(MessageKind),
}

/// What one member brought to a collective.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Arrival {
    pub(super) call: Call,
    pub(super) len: usize,
    pub(super) cols: Option<usize>,
    pub(super) world_rank: usize,
}

impl Arrival {
    pub(super) fn describe(&self) -> String {
        match self.call {
            Call::Split(_) => "a split".into(),
            Call::Message(k) => format!("{} of {} elements", k.name(), self.len),
        }
    }
}

/// A collective (or split) waiting for its members.
pub(super) struct Pending {
    pub(super) arrived: Vec<Option<Arrival>>,
    pub(super) count: usize,
    pub(super) departed: usize,
    /// Joins the members' records.
    pub(super) instance: u64,
    /// Set when the last member arrived.
    pub(super) outcome: Option<std::result::Result<Completed, String>>,
}

/// A new group: its key in the shared state and its world ranks.
pub(super) type NewGroup = (usize, Arc<[usize]>);

#[derive(Clone)]
pub(super) struct Completed {
    pub(super) instance: u64,
    /// Broadcasts: the root's row width.
    pub(super) cols: Option<usize>,
    /// Splits: each member's new group (key, world ranks), by group rank
    /// (shared: every member takes a copy of the outcome).
    pub(super) groups: Arc<Vec<Option<NewGroup>>>,
}

/// A message in flight on a channel.
pub(super) struct InFlight {
    pub(super) message: u64,
    pub(super) bytes: u64,
    pub(super) host: bool,
    pub(super) cols: Option<usize>,
    /// Host messages carry their values: a dataflow sizes its messages
    /// and GEMMs by the token counts an expert group exchanges.
    pub(super) values: Vec<u32>,
}

/// A channel of point-to-point messages: (group key, sending world rank, receiving world rank).
pub(super) type Channel = (usize, usize, usize);

#[derive(Default)]
pub(super) struct State {
    pub(super) aborted: Option<String>,
    pub(super) blocked: Vec<bool>,
    /// How many of `blocked` are set.
    pub(super) blocked_count: usize,
    pub(super) waiting_on: Vec<String>,
    /// The channel each blocked rank waits on (`None`: a split), so that a
    /// send wakes only a receiver it lets go on: 1024 ranks on a few cores
    /// spend their time in wake-ups otherwise.
    pub(super) awaits: Vec<Option<Channel>>,
    pub(super) finished: usize,
    pub(super) next_key: usize,
    pub(super) next_id: u64,
    pub(super) pending: FxHashMap<(usize, u64), Pending>,
    pub(super) channels: FxHashMap<Channel, VecDeque<InFlight>>,
}

impl State {
    pub(super) fn block(&mut self, rank: usize, on: String, channel: Option<Channel>) {
        if !std::mem::replace(&mut self.blocked[rank], true) {
            self.blocked_count += 1;
        }
        self.waiting_on[rank] = on;
        self.awaits[rank] = channel;
    }
    /// Marks `rank` as able to go on; whether it was waiting (and so needs waking).
    pub(super) fn release(&mut self, rank: usize) -> bool {
        let waiting = std::mem::replace(&mut self.blocked[rank], false);
        if waiting {
            self.blocked_count -= 1;
        }
        waiting
    }
    pub(super) fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// The shared state of one simulated world.
pub struct SimWorld {
    pub(super) size: usize,
    pub(super) state: Mutex<State>,
    pub(super) wake: Vec<Condvar>,
}

impl SimWorld {
    pub fn new(size: usize) -> Self {
        let state = State { blocked: vec![false; size], waiting_on: vec![String::new(); size], awaits: vec![None; size], next_key: 1, ..Default::default() };
        Self { size, state: Mutex::new(state), wake: (0..size).map(|_| Condvar::new()).collect() }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn unblock(&self, st: &mut State, rank: usize) {
        if st.release(rank) {
            self.wake[rank].notify_one();
        }
    }

    /// Wakes ranks released under the lock, once it is dropped (a woken
    /// rank's first act is to take it).
    pub(super) fn wake_released(&self, ranks: &[usize]) {
        // Last first: trees reduce towards the lowest rank, so a released
        // rank more often waits next for a higher one than for a lower one.
        for &r in ranks.iter().rev() {
            self.wake[r].notify_one();
        }
    }

    /// Ends the simulation on every rank (a rank failed).
    pub fn abort(&self, why: &str) {
        let mut st = self.lock();
        if st.aborted.is_none() {
            st.aborted = Some(why.to_string());
        }
        for r in 0..self.size {
            self.unblock(&mut st, r);
        }
    }

    /// A rank's program ended; if every other live rank waits, none can go on.
    pub(super) fn finish(&self) {
        let mut st = self.lock();
        st.finished += 1;
        self.check_deadlock(&mut st);
    }

    pub(super) fn check_deadlock(&self, st: &mut State) {
        let blocked = st.blocked_count;
        if blocked > 0 && blocked + st.finished == self.size && st.aborted.is_none() {
            let list: Vec<String> = (0..self.size).filter(|&r| st.blocked[r]).map(|r| format!("rank {r} waits for {}", st.waiting_on[r])).collect();
            st.aborted = Some(format!("no rank can make progress: {}", list.join("; ")));
            for r in 0..self.size {
                self.unblock(st, r);
            }
        }
    }
}

/// A broadcast's root's row width, where the root has arrived.
pub(super) fn root_cols(st: &State, key: usize, seq: u64) -> Option<Option<usize>> {
    let p = st.pending.get(&(key, seq))?;
    let first = p.arrived.iter().flatten().next()?;
    match first.call {
        Call::Message(MessageKind::Broadcast { root } | MessageKind::HostBroadcast { root }) => p.arrived.get(root).and_then(|a| a.as_ref()).map(|a| a.cols),
        _ => Some(first.cols),
    }
}

/// Checks that every member of a collective did the same thing and decides
/// its outcome (a split's new groups).
pub(super) fn complete(st: &mut State, group: &str, instance: u64, arrived: &[Arrival]) -> std::result::Result<Completed, String> {
    let first = &arrived[0];
    for (r, a) in arrived.iter().enumerate() {
        let same = match (first.call, a.call) {
            (Call::Split(_), Call::Split(_)) => true,
            (Call::Message(x), Call::Message(y)) => x == y && a.len == first.len,
            _ => false,
        };
        if !same {
            return Err(format!("collective mismatch on `{group}`: group rank 0 calls {}, group rank {r} calls {}", first.describe(), a.describe()));
        }
    }
    let cols = match first.call {
        Call::Message(MessageKind::Broadcast { root } | MessageKind::HostBroadcast { root }) => arrived.get(root).and_then(|a| a.cols),
        _ => first.cols,
    };
    let mut groups = vec![None; arrived.len()];
    if matches!(first.call, Call::Split(_)) {
        let mut by_color: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (r, a) in arrived.iter().enumerate() {
            if let Call::Split(Some(c)) = a.call {
                by_color.entry(c).or_default().push(r);
            }
        }
        for members in by_color.values() {
            let key = st.next_key;
            st.next_key += 1;
            let ranks: Arc<[usize]> = members.iter().map(|&r| arrived[r].world_rank).collect();
            for &r in members {
                groups[r] = Some((key, ranks.clone()));
            }
        }
    }
    Ok(Completed { instance, cols, groups: Arc::new(groups) })
}
