//! `--state-file`: rooms' epoch, seq and history, kept across restarts so a
//! client reconnecting after one can recover with `since`/`epoch` as if the
//! server had never gone away.
//!
//! The file is written when a run starts, every [`SNAPSHOT_INTERVAL_MS`] while
//! rooms change (by a thread of its own, off the event loop), and on graceful
//! shutdown. Only the shutdown write is marked `clean`. A run that ends any
//! other way (crash, SIGKILL, power loss) may have given out seqs after its
//! last write, and clients may hold them; since a seq is never given twice
//! within one epoch (§11), a start that finds an unclean file gives every room
//! a new epoch, so such a client gets `recovered: false` instead of a silent
//! gap. The start rewrites the file unclean at once, so a crash at any later
//! point is recognised at the next start.
//!
//! The write is atomic (temporary file in the same directory, fsync, rename,
//! fsync of the directory), so a crash mid-write leaves the previous file. A
//! file that cannot be read is moved aside, never overwritten, and the server
//! starts fresh.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;

use bytes::Bytes;
use log::error;
use serde::{Deserialize, Serialize};

use crate::protocol::is_valid_room_name;

/// Format version written into the file. Version 2 added `clean`.
const VERSION: u32 = 2;

/// How often the rooms are written while the server runs, if they changed:
/// the most history a crash can lose.
pub const SNAPSHOT_INTERVAL_MS: u64 = 10_000;

/// One room as it is saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomSnapshot {
    /// Room name.
    pub name: String,
    /// The room's epoch.
    pub epoch: String,
    /// Last seq published.
    pub seq: u64,
    /// (seq, the `message` frame's JSON text), oldest first.
    pub history: Vec<(u64, String)>,
}

impl RoomSnapshot {
    /// A room held as frames (`(seq, message frame)`, oldest first) as it is
    /// saved: the frames' JSON text.
    pub fn from_frames(
        name: &str,
        epoch: &str,
        seq: u64,
        history: &VecDeque<(u64, Bytes)>,
    ) -> Self {
        RoomSnapshot {
            name: name.to_string(),
            epoch: epoch.to_string(),
            seq,
            history: history
                .iter()
                .filter_map(|(seq, frame)| {
                    crate::protocol::text_frame_payload(frame).map(|text| (*seq, text.to_string()))
                })
                .collect(),
        }
    }

    /// The newest `keep` saved messages framed again, oldest first (a
    /// smaller `--history` than the file's keeps the end).
    pub fn history_frames(&self, keep: usize) -> VecDeque<(u64, Bytes)> {
        let keep_from = self.history.len().saturating_sub(keep);
        self.history
            .iter()
            .skip(keep_from)
            .map(|(seq, text)| (*seq, crate::protocol::text_frame(text)))
            .collect()
    }
}

/// The file as it is written.
#[derive(Serialize)]
struct StateFileOut<'a> {
    version: u32,
    clean: bool,
    rooms: &'a [RoomSnapshot],
}

/// The file as it is read: version 1 or 2.
#[derive(Deserialize)]
struct StateFileIn {
    version: u32,
    /// Absent in version 1.
    #[serde(default)]
    clean: Option<bool>,
    rooms: Vec<RoomSnapshot>,
}

/// Who writes the file, which decides its `clean` mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// A run that goes on: it may give out more seqs after this write.
    Running,
    /// The last write of a graceful shutdown: no seq was given after it.
    CleanShutdown,
}

/// Why a state file was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file is not a roomcast state file of a known version.
    #[error("{path} is not a valid roomcast state file: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// What loading found.
#[derive(Debug)]
pub enum Loaded {
    /// No file: a first start.
    Fresh,
    /// The rooms of the last write.
    Rooms {
        /// From [`load`], as in the file; from [`open_for_run`], with the
        /// epochs this run uses (see [`rooms_for_run`]).
        rooms: Vec<RoomSnapshot>,
        /// Whether a graceful shutdown wrote the file.
        clean: bool,
    },
    /// An unreadable or corrupt file, moved to `moved_to` (if moving worked).
    SetAside {
        /// Why it could not be used.
        error: StateError,
        /// Where it is now.
        moved_to: Option<PathBuf>,
    },
}

/// Reads the state file; never fails the start.
pub fn load(path: &Path, unix_seconds: u64) -> Loaded {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Loaded::Fresh,
        Err(source) => {
            return set_aside(
                path,
                StateError::Read {
                    path: path.to_path_buf(),
                    source,
                },
                unix_seconds,
            );
        }
    };
    match parse_file(&bytes) {
        Ok((rooms, clean)) => Loaded::Rooms { rooms, clean },
        Err(reason) => set_aside(
            path,
            StateError::Invalid {
                path: path.to_path_buf(),
                reason,
            },
            unix_seconds,
        ),
    }
}

/// The rooms a run restores from a file marked `clean` or not (§11).
///
/// After a clean shutdown they go on as they were. After any other ending the
/// previous run may have given out seqs the file does not know of, under the
/// saved epochs; so each room starts a new epoch (from `new_epoch`), keeping
/// its seq counter and its history. The history's seqs are all at most the
/// saved seq and new publishes continue after it, so within the new epoch too
/// no seq is given twice.
pub fn rooms_for_run(
    mut rooms: Vec<RoomSnapshot>,
    clean: bool,
    mut new_epoch: impl FnMut() -> String,
) -> Vec<RoomSnapshot> {
    if !clean {
        for room in &mut rooms {
            room.epoch = new_epoch();
        }
    }
    rooms
}

/// The start of a run: [`load`], the epochs of [`rooms_for_run`], then at once
/// the file rewritten with those rooms marked unclean, so that a crash at any
/// later point is recognised at the next start.
///
/// Returns what was loaded and how the rewrite went (the start goes on
/// either way). An unreadable file that could not be moved aside is left as
/// it is, not rewritten.
pub fn open_for_run(
    path: &Path,
    unix_seconds: u64,
    new_epoch: impl FnMut() -> String,
) -> (Loaded, io::Result<()>) {
    let loaded = match load(path, unix_seconds) {
        Loaded::Rooms { rooms, clean } => Loaded::Rooms {
            rooms: rooms_for_run(rooms, clean, new_epoch),
            clean,
        },
        other => other,
    };
    let marked = match &loaded {
        Loaded::Rooms { rooms, .. } => save(path, rooms, Mark::Running),
        Loaded::Fresh
        | Loaded::SetAside {
            moved_to: Some(_), ..
        } => save(path, &[], Mark::Running),
        Loaded::SetAside { moved_to: None, .. } => Err(io::Error::other(
            "the unreadable file could not be moved aside and is left as it is",
        )),
    };
    (loaded, marked)
}

fn set_aside(path: &Path, error: StateError, unix_seconds: u64) -> Loaded {
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".corrupt-{unix_seconds}"));
    let aside = PathBuf::from(aside);
    let moved_to = fs::rename(path, &aside).ok().map(|()| aside);
    Loaded::SetAside { error, moved_to }
}

/// Parses and validates the file's bytes: its rooms, clean or not (see [`load`]
/// for the mark).
pub fn parse(bytes: &[u8]) -> Result<Vec<RoomSnapshot>, String> {
    parse_file(bytes).map(|(rooms, _clean)| rooms)
}

/// Parses and validates the file's bytes: its rooms and its `clean` mark.
fn parse_file(bytes: &[u8]) -> Result<(Vec<RoomSnapshot>, bool), String> {
    let file: StateFileIn = serde_json::from_slice(bytes).map_err(|error| error.to_string())?;
    let clean = match (file.version, file.clean) {
        // Version 1 had no mark and was only ever written by a graceful shutdown.
        (1, _) => true,
        (VERSION, Some(clean)) => clean,
        (VERSION, None) => return Err(format!("version {VERSION} without \"clean\"")),
        (version, _) => return Err(format!("version {version} (expected 1 or {VERSION})")),
    };
    for room in &file.rooms {
        if !is_valid_room_name(&room.name) {
            return Err(format!("bad room name {:?}", room.name));
        }
        let mut previous = 0;
        for (seq, text) in &room.history {
            if *seq <= previous || *seq > room.seq {
                return Err(format!(
                    "room {}: history seq {seq} out of order",
                    room.name
                ));
            }
            previous = *seq;
            if serde_json::from_str::<serde::de::IgnoredAny>(text).is_err() {
                return Err(format!(
                    "room {}: history entry {seq} is not JSON",
                    room.name
                ));
            }
        }
    }
    Ok((file.rooms, clean))
}

/// Writes the rooms atomically: temporary file, fsync, rename, fsync of the directory.
pub fn save(path: &Path, rooms: &[RoomSnapshot], mark: Mark) -> io::Result<()> {
    let file = StateFileOut {
        version: VERSION,
        clean: mark == Mark::CleanShutdown,
        rooms,
    };
    let bytes = serde_json::to_vec(&file).map_err(io::Error::other)?;
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // One name per process: writes must not overlap (see `Snapshots::finish`).
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".tmp-{}", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let written = (|| {
        let mut out = File::create(&temporary)?;
        out.write_all(&bytes)?;
        out.sync_all()?;
        fs::rename(&temporary, path)?;
        File::open(&directory)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written
}

/// The periodic writes of a running server, done by a thread of their own:
/// a write ends in fsyncs that can take long on a busy disk, and the event
/// loop must not wait for them. Each is marked unclean ([`Mark::Running`]).
pub struct Snapshots {
    /// The snapshot the writer has not taken yet. A newer one replaces it, so
    /// however slow the disk, at most one waits (besides the one being written).
    pending: Arc<Mutex<Option<Vec<RoomSnapshot>>>>,
    /// Tells the writer a snapshot is pending; dropping it ends the thread.
    wake: Option<mpsc::Sender<()>>,
    writer: Option<JoinHandle<()>>,
    /// The hub's `room_changes` when the last snapshot was taken.
    taken_at_changes: u64,
}

impl Snapshots {
    /// Starts the writer thread for `path`; `changes` is the hub's change
    /// count of what the file already holds.
    pub fn start(path: PathBuf, changes: u64) -> io::Result<Self> {
        let pending: Arc<Mutex<Option<Vec<RoomSnapshot>>>> = Arc::default();
        let (wake, woken) = mpsc::channel::<()>();
        let slot = Arc::clone(&pending);
        let writer = std::thread::Builder::new()
            .name("state-snapshots".into())
            .spawn(move || {
                while woken.recv().is_ok() {
                    let rooms = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
                    if let Some(rooms) = rooms
                        && let Err(error) = save(&path, &rooms, Mark::Running)
                    {
                        error!("cannot save state snapshot to {}: {error}", path.display());
                    }
                }
            })?;
        Ok(Snapshots {
            pending,
            wake: Some(wake),
            writer: Some(writer),
            taken_at_changes: changes,
        })
    }

    /// Hands the writer the rooms from `export` if `changes` (the hub's
    /// `room_changes`) moved since the last snapshot; returns whether it did.
    pub fn offer(&mut self, changes: u64, export: impl FnOnce() -> Vec<RoomSnapshot>) -> bool {
        if changes == self.taken_at_changes {
            return false;
        }
        self.taken_at_changes = changes;
        *self.pending.lock().unwrap_or_else(PoisonError::into_inner) = Some(export());
        if let Some(wake) = &self.wake {
            // A send fails only if the writer is gone; the shutdown save still runs.
            let _ = wake.send(());
        }
        true
    }

    /// Stops the writer, waiting for a write in progress, so that the
    /// shutdown's clean save lands after it and is not replaced by an older
    /// unclean snapshot (nor overlaps it on the temporary file). A snapshot
    /// still pending is dropped: the shutdown save supersedes it.
    pub fn finish(mut self) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.wake.take();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            error!("the state snapshot thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("roomcast-state-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir.join("state.json")
    }

    fn room() -> RoomSnapshot {
        RoomSnapshot {
            name: "lobby".into(),
            epoch: "e1".into(),
            seq: 3,
            history: vec![(2, r#"{"type":"message"}"#.into()), (3, "{}".into())],
        }
    }

    /// Epochs "new-1", "new-2", … in order, so tests can tell them apart.
    fn numbered_epochs() -> impl FnMut() -> String {
        let mut next = 0;
        move || {
            next += 1;
            format!("new-{next}")
        }
    }

    fn loaded_rooms(loaded: Loaded) -> (Vec<RoomSnapshot>, bool) {
        match loaded {
            Loaded::Rooms { rooms, clean } => (rooms, clean),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn round_trip() {
        let path = scratch("round-trip");
        save(&path, &[room()], Mark::CleanShutdown).unwrap();
        assert_eq!(loaded_rooms(load(&path, 1)), (vec![room()], true));
        save(&path, &[], Mark::CleanShutdown).unwrap();
        assert_eq!(loaded_rooms(load(&path, 1)), (Vec::new(), true));
    }

    #[test]
    fn the_clean_mark_round_trips() {
        let path = scratch("clean-mark");
        save(&path, &[room()], Mark::Running).unwrap();
        assert_eq!(loaded_rooms(load(&path, 1)), (vec![room()], false));
        save(&path, &[room()], Mark::CleanShutdown).unwrap();
        assert_eq!(loaded_rooms(load(&path, 1)), (vec![room()], true));
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(r#"{"version":2,"clean":true,"#), "{text}");
    }

    #[test]
    fn a_version_1_file_reads_as_clean() {
        let path = scratch("version-1");
        fs::write(
            &path,
            r#"{"version":1,"rooms":[{"name":"lobby","epoch":"e1","seq":3,"history":[[2,"{\"type\":\"message\"}"],[3,"{}"]]}]}"#,
        )
        .unwrap();
        assert_eq!(loaded_rooms(load(&path, 1)), (vec![room()], true));
    }

    #[test]
    fn rooms_keep_their_epochs_after_a_clean_shutdown() {
        let rooms = rooms_for_run(vec![room()], true, numbered_epochs());
        assert_eq!(rooms, vec![room()]);
    }

    #[test]
    fn rooms_start_new_epochs_after_an_unclean_stop_keeping_seq_and_history() {
        let other = RoomSnapshot {
            name: "news".into(),
            epoch: "e2".into(),
            seq: 0,
            history: Vec::new(),
        };
        let rooms = rooms_for_run(vec![room(), other.clone()], false, numbered_epochs());
        assert_eq!(
            rooms,
            vec![
                RoomSnapshot {
                    epoch: "new-1".into(),
                    ..room()
                },
                RoomSnapshot {
                    epoch: "new-2".into(),
                    ..other
                },
            ]
        );
    }

    #[test]
    fn opening_for_a_run_marks_the_file_unclean_at_once() {
        let path = scratch("open-clean");
        save(&path, &[room()], Mark::CleanShutdown).unwrap();
        let (loaded, marked) = open_for_run(&path, 1, numbered_epochs());
        marked.unwrap();
        assert_eq!(loaded_rooms(loaded), (vec![room()], true), "epochs kept");
        // A crash now: the next start sees an unclean file and renews the epochs.
        assert_eq!(loaded_rooms(load(&path, 1)), (vec![room()], false));
        let (loaded, marked) = open_for_run(&path, 1, numbered_epochs());
        marked.unwrap();
        let renewed = RoomSnapshot {
            epoch: "new-1".into(),
            ..room()
        };
        assert_eq!(loaded_rooms(loaded), (vec![renewed.clone()], false));
        // The file now holds the renewed epochs, still unclean.
        assert_eq!(loaded_rooms(load(&path, 1)), (vec![renewed], false));
    }

    #[test]
    fn opening_for_a_first_run_writes_an_empty_unclean_file() {
        let path = scratch("open-fresh");
        let (loaded, marked) = open_for_run(&path, 1, numbered_epochs());
        marked.unwrap();
        assert!(matches!(loaded, Loaded::Fresh), "{loaded:?}");
        assert_eq!(loaded_rooms(load(&path, 1)), (Vec::new(), false));
    }

    #[test]
    fn a_failed_mark_is_reported_and_the_rooms_still_load() {
        let path = scratch("open-unwritable");
        save(&path, &[room()], Mark::CleanShutdown).unwrap();
        // The temporary file's name is taken by a directory: the rewrite fails.
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(format!(".tmp-{}", std::process::id()));
        fs::create_dir(PathBuf::from(temporary)).unwrap();
        let (loaded, marked) = open_for_run(&path, 1, numbered_epochs());
        assert!(marked.is_err());
        assert_eq!(loaded_rooms(loaded), (vec![room()], true));
    }

    #[test]
    fn snapshots_are_written_only_when_something_changed() {
        let path = scratch("snapshots");
        let mut snapshots = Snapshots::start(path.clone(), 7).unwrap();
        assert!(!snapshots.offer(7, || panic!("nothing changed: no export")));
        assert!(snapshots.offer(8, || vec![room()]));
        assert!(!snapshots.offer(8, Vec::new));
        // The rename makes the file appear whole.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !path.exists() {
            assert!(std::time::Instant::now() < deadline, "no snapshot written");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(loaded_rooms(load(&path, 1)), (vec![room()], false));
        snapshots.finish();
    }

    #[test]
    fn missing_file_is_a_fresh_start() {
        let path = scratch("missing");
        assert!(matches!(load(&path, 1), Loaded::Fresh));
    }

    #[test]
    fn corrupt_file_is_set_aside_not_overwritten() {
        let path = scratch("corrupt");
        fs::write(&path, b"{not json").unwrap();
        match load(&path, 42) {
            Loaded::SetAside { moved_to, .. } => {
                let moved_to = moved_to.expect("moved");
                assert!(moved_to.to_string_lossy().ends_with(".corrupt-42"));
                assert_eq!(fs::read(moved_to).unwrap(), b"{not json");
            }
            other => panic!("{other:?}"),
        }
        assert!(!path.exists());
    }

    #[test]
    fn invalid_contents_are_refused() {
        for bad in [
            r#"{"version":3,"clean":true,"rooms":[]}"#,
            r#"{"version":2,"rooms":[]}"#,
            r#"{"version":2,"clean":"yes","rooms":[]}"#,
            r#"{"version":1,"rooms":[{"name":"bad room","epoch":"e","seq":0,"history":[]}]}"#,
            r#"{"version":1,"rooms":[{"name":"a","epoch":"e","seq":1,"history":[[2,"{}"]]}]}"#,
            r#"{"version":1,"rooms":[{"name":"a","epoch":"e","seq":3,"history":[[2,"{}"],[2,"{}"]]}]}"#,
            r#"{"version":2,"clean":false,"rooms":[{"name":"a","epoch":"e","seq":3,"history":[[2,"{"]]}]}"#,
            r#"[]"#,
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
