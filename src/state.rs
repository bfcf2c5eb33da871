//! `--state-file`: rooms' epoch, seq and history, written on graceful
//! shutdown and read at start, so a client reconnecting after a restart can
//! recover with `since`/`epoch` as if the server had never gone away.
//!
//! The write is atomic (temporary file in the same directory, fsync, rename,
//! fsync of the directory), so a crash mid-write leaves the previous file. A
//! file that cannot be read is moved aside, never overwritten, and the server
//! starts fresh.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocol::is_valid_room_name;

/// Format version written into the file.
const VERSION: u32 = 1;

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

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    rooms: Vec<RoomSnapshot>,
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
    /// The file is not a roomcast state file of this version.
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
    /// The rooms of the last graceful shutdown.
    Rooms(Vec<RoomSnapshot>),
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
    match parse(&bytes) {
        Ok(rooms) => Loaded::Rooms(rooms),
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

fn set_aside(path: &Path, error: StateError, unix_seconds: u64) -> Loaded {
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".corrupt-{unix_seconds}"));
    let aside = PathBuf::from(aside);
    let moved_to = fs::rename(path, &aside).ok().map(|()| aside);
    Loaded::SetAside { error, moved_to }
}

/// Parses and validates the file's bytes.
pub fn parse(bytes: &[u8]) -> Result<Vec<RoomSnapshot>, String> {
    let file: StateFile = serde_json::from_slice(bytes).map_err(|error| error.to_string())?;
    if file.version != VERSION {
        return Err(format!("version {} (expected {VERSION})", file.version));
    }
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
    Ok(file.rooms)
}

/// Writes the rooms atomically: temporary file, fsync, rename, fsync of the directory.
pub fn save(path: &Path, rooms: Vec<RoomSnapshot>) -> io::Result<()> {
    let file = StateFile {
        version: VERSION,
        rooms,
    };
    let bytes = serde_json::to_vec(&file).map_err(io::Error::other)?;
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
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

    #[test]
    fn round_trip() {
        let path = scratch("round-trip");
        save(&path, vec![room()]).unwrap();
        match load(&path, 1) {
            Loaded::Rooms(rooms) => assert_eq!(rooms, vec![room()]),
            other => panic!("{other:?}"),
        }
        save(&path, Vec::new()).unwrap();
        assert!(matches!(load(&path, 1), Loaded::Rooms(rooms) if rooms.is_empty()));
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
            r#"{"version":2,"rooms":[]}"#,
            r#"{"version":1,"rooms":[{"name":"bad room","epoch":"e","seq":0,"history":[]}]}"#,
            r#"{"version":1,"rooms":[{"name":"a","epoch":"e","seq":1,"history":[[2,"{}"]]}]}"#,
            r#"{"version":1,"rooms":[{"name":"a","epoch":"e","seq":3,"history":[[2,"{}"],[2,"{}"]]}]}"#,
            r#"{"version":1,"rooms":[{"name":"a","epoch":"e","seq":3,"history":[[2,"{"]]}]}"#,
            r#"[]"#,
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
