//! `--state-file` on the loop: restoring at start, periodic snapshots handed
//! to the writer thread, and the clean save at exit.

use log::{error, info, warn};

use super::server::{Server, ServerTimer, now_ms};
use crate::hub::{Hub, Millis};
use crate::state;

impl Server {
    /// Hands the rooms to the `--state-file` writer thread if they changed
    /// since the last snapshot, so a crash loses at most one interval of
    /// history; the loop only collects them, the thread writes.
    pub(super) fn snapshot_state(&mut self, now: Millis) {
        let Some(snapshots) = &mut self.snapshots else {
            return;
        };
        let hub = &self.hub;
        snapshots.offer(hub.room_changes(), || hub.export_rooms());
        self.timers.schedule(
            now + state::SNAPSHOT_INTERVAL_MS,
            ServerTimer::StateSnapshot,
        );
    }

    /// Writes `--state-file`, if given, after the drain, marked clean: the
    /// next start keeps the rooms' epochs.
    pub(super) fn save_state(&mut self) {
        let Some(path) = &self.args.state_file else {
            return;
        };
        if self.bridge.is_some() {
            return;
        }
        // A periodic write still running must land first, or its older,
        // unclean snapshot would replace this one.
        if let Some(snapshots) = self.snapshots.take() {
            snapshots.finish();
        }
        let rooms = self.hub.export_rooms();
        match state::save(path, &rooms, state::Mark::CleanShutdown) {
            Ok(()) => info!("saved {} room(s) to {}", rooms.len(), path.display()),
            Err(error) => error!("cannot save state to {}: {error}", path.display()),
        }
    }
}

/// Loads `--state-file` into the hub (a bad file is set aside and the server
/// starts fresh), marks the file unclean for as long as the run lasts, and
/// starts the periodic writes. Never fails the start.
pub(super) fn restore_state(hub: &mut Hub, path: &std::path::Path) -> Option<state::Snapshots> {
    let now = now_ms();
    let new_epoch = || crate::hub::random_epoch().into_string();
    let (loaded, marked) = state::open_for_run(path, now / 1000, new_epoch);
    match loaded {
        state::Loaded::Fresh => info!("no state file at {}; starting fresh", path.display()),
        state::Loaded::Rooms { rooms, clean } => {
            info!("loaded {} room(s) from {}", rooms.len(), path.display());
            if !clean {
                warn!(
                    "state file {} was not saved by a clean shutdown: {} rooms start new epochs",
                    path.display(),
                    rooms.len()
                );
            }
            hub.import_rooms(rooms, now);
        }
        state::Loaded::SetAside { error, moved_to } => match moved_to {
            Some(aside) => warn!(
                "{error}; moved it to {} and starting fresh",
                aside.display()
            ),
            None => warn!("{error}; could not move it aside, starting fresh"),
        },
    }
    if let Err(error) = marked {
        error!(
            "cannot mark state file {} as in use: {error}; a crash would go unnoticed at the next start",
            path.display()
        );
    }
    match state::Snapshots::start(path.to_path_buf(), hub.room_changes()) {
        Ok(snapshots) => Some(snapshots),
        Err(error) => {
            error!(
                "cannot start the state snapshot thread: {error}; the rooms are saved only on shutdown"
            );
            None
        }
    }
}
