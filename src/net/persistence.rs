//! `--state-file` for the process: the rooms loaded at start and handed to
//! the loops, each loop's rooms collected into periodic snapshots (written
//! off the loops by the writer thread), and the clean save once every loop
//! has stopped.

use std::path::{Path, PathBuf};
use std::sync::PoisonError;

use log::{error, info, warn};

use super::server::{EventLoop, ServerTimer, now_ms};
use crate::hub::Millis;
use crate::state::{self, RoomSnapshot};

/// Every loop's rooms as it last gave them, and the writer thread.
pub struct Keeper {
    path: PathBuf,
    /// By loop index.
    rooms: Vec<Vec<RoomSnapshot>>,
    /// Bumped whenever a loop gives its rooms: the snapshot's change count.
    version: u64,
    snapshots: Option<state::Snapshots>,
}

impl Keeper {
    /// A keeper for `loops` loops writing to `path` (its writer thread
    /// started; without it the rooms are saved only at exit).
    pub fn start(path: &Path, loops: usize) -> Keeper {
        let snapshots = match state::Snapshots::start(path.to_path_buf(), 0) {
            Ok(snapshots) => Some(snapshots),
            Err(error) => {
                error!(
                    "cannot start the state snapshot thread: {error}; the rooms are saved only on shutdown"
                );
                None
            }
        };
        Keeper {
            path: path.to_path_buf(),
            rooms: vec![Vec::new(); loops],
            version: 0,
            snapshots,
        }
    }

    /// Loop `index`'s rooms now; with `snapshot`, every loop's rooms go to
    /// the writer thread.
    pub fn give(&mut self, index: usize, rooms: Vec<RoomSnapshot>, snapshot: bool) {
        if let Some(slot) = self.rooms.get_mut(index) {
            *slot = rooms;
        }
        self.version += 1;
        if snapshot && let Some(snapshots) = self.snapshots.as_mut() {
            let all = &self.rooms;
            snapshots.offer(self.version, || all.iter().flatten().cloned().collect());
        }
    }

    /// Every loop has stopped and given its rooms: waits for a periodic write
    /// still running (or it would replace this one), then saves them marked
    /// clean, so the next start keeps their epochs.
    pub fn save_clean(mut self) {
        if let Some(snapshots) = self.snapshots.take() {
            snapshots.finish();
        }
        let rooms: Vec<RoomSnapshot> = self.rooms.into_iter().flatten().collect();
        match state::save(&self.path, &rooms, state::Mark::CleanShutdown) {
            Ok(()) => info!("saved {} room(s) to {}", rooms.len(), self.path.display()),
            Err(error) => error!("cannot save state to {}: {error}", self.path.display()),
        }
    }
}

impl EventLoop {
    /// Gives the keeper this loop's rooms if they changed since it last
    /// did, for a snapshot; a crash loses at most one interval of history.
    /// The loop only collects them, the writer thread writes.
    pub(super) fn snapshot_state(&mut self, now: Millis) {
        self.give_rooms(true);
        self.timers.schedule(
            now + state::SNAPSHOT_INTERVAL_MS,
            ServerTimer::StateSnapshot,
        );
    }

    /// At exit: this loop's rooms for the clean save.
    pub(super) fn deposit_state(&mut self) {
        self.give_rooms(false);
    }

    fn give_rooms(&mut self, snapshot: bool) {
        let Some(keeper) = &self.shared.keeper else {
            return;
        };
        let changes = self.hub.room_changes();
        if self.deposited_changes == Some(changes) {
            return;
        }
        self.deposited_changes = Some(changes);
        let rooms = self.hub.export_rooms();
        let mut keeper = keeper.lock().unwrap_or_else(PoisonError::into_inner);
        keeper.give(self.index, rooms, snapshot);
    }
}

/// Loads `--state-file` (a bad file is set aside and the server starts
/// fresh) and marks it unclean for as long as the run lasts. Never fails
/// the start.
pub(super) fn load_state(path: &Path) -> Vec<RoomSnapshot> {
    let now = now_ms();
    let new_epoch = || crate::hub::random_epoch().into_string();
    let (loaded, marked) = state::open_for_run(path, now / 1000, new_epoch);
    let rooms = match loaded {
        state::Loaded::Fresh => {
            info!("no state file at {}; starting fresh", path.display());
            Vec::new()
        }
        state::Loaded::Rooms { rooms, clean } => {
            info!("loaded {} room(s) from {}", rooms.len(), path.display());
            if !clean {
                warn!(
                    "state file {} was not saved by a clean shutdown: {} rooms start new epochs",
                    path.display(),
                    rooms.len()
                );
            }
            rooms
        }
        state::Loaded::SetAside { error, moved_to } => {
            match moved_to {
                Some(aside) => warn!(
                    "{error}; moved it to {} and starting fresh",
                    aside.display()
                ),
                None => warn!("{error}; could not move it aside, starting fresh"),
            }
            Vec::new()
        }
    };
    if let Err(error) = marked {
        error!(
            "cannot mark state file {} as in use: {error}; a crash would go unnoticed at the next start",
            path.display()
        );
    }
    rooms
}
