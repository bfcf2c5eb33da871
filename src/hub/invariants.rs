//! The hub's cross-references, checked in full: for tests and fuzzing.

use std::collections::HashMap;

use super::Hub;

impl Hub {
    /// Checks that the hub's cross-references agree: memberships both ways,
    /// user counts, the occupied-room count, the user index, the hard mark,
    /// and the joining count of every room. O(everything).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.check_sessions()?;
        self.check_users()?;
        self.check_rooms()
    }

    fn check_sessions(&self) -> Result<(), String> {
        let mut open = 0;
        for (conn, session) in self.sessions.iter().enumerate() {
            let Some(session) = session else { continue };
            open += 1;
            if !session.closing && session.outbound.len() > self.config.marks.hard {
                return Err(format!("connection {conn} is over the hard mark"));
            }
            if session.closing && !session.memberships.is_empty() {
                return Err(format!("closing connection {conn} is still in rooms"));
            }
            for membership in &session.memberships {
                let member = self
                    .rooms
                    .get(membership.room)
                    .and_then(|room| room.members.get(membership.slot));
                if member != Some(&conn) {
                    return Err(format!(
                        "connection {conn}: membership of room {} slot {} not mirrored",
                        membership.room, membership.slot
                    ));
                }
            }
            let listed = self
                .users
                .get(&session.user_id)
                .is_some_and(|conns| conns.contains(&conn));
            if !session.echo && !session.closing && !listed {
                return Err(format!("connection {conn} missing from the user index"));
            }
        }
        if open != self.open_sessions {
            return Err(format!(
                "open_sessions {} but {open} sessions",
                self.open_sessions
            ));
        }
        Ok(())
    }

    fn check_users(&self) -> Result<(), String> {
        for (user_id, conns) in &self.users {
            for &conn in conns {
                let matches = self
                    .session(conn)
                    .is_some_and(|s| *s.user_id == **user_id && !s.closing);
                if !matches {
                    return Err(format!("user index lists {conn} for {user_id}"));
                }
            }
        }
        Ok(())
    }

    fn check_rooms(&self) -> Result<(), String> {
        let mut occupied = 0;
        for (room_id, room) in &self.rooms {
            if self.room_ids.get(&room.name) != Some(&room_id) {
                return Err(format!("room {} missing from the name index", room.name));
            }
            if !room.members.is_empty() {
                occupied += 1;
            }
            let mut per_user: HashMap<&str, u32> = HashMap::new();
            let mut joining = 0;
            for (slot, &member) in room.members.iter().enumerate() {
                let Some(session) = self.session(member) else {
                    return Err(format!("room {} lists a freed connection", room.name));
                };
                let membership = session
                    .memberships
                    .iter()
                    .find(|m| m.room == room_id && m.slot == slot);
                let Some(membership) = membership else {
                    return Err(format!("room {} slot {slot} not mirrored", room.name));
                };
                if membership.cursor.is_some() {
                    joining += 1;
                }
                *per_user.entry(&session.user_id).or_default() += 1;
            }
            let counts_agree = per_user.len() == room.users.len()
                && per_user
                    .iter()
                    .all(|(user, count)| room.users.get(*user) == Some(count));
            if !counts_agree {
                return Err(format!("room {} user counts disagree", room.name));
            }
            if joining != room.joining {
                return Err(format!(
                    "room {}: {} joining members counted, {joining} found",
                    room.name, room.joining
                ));
            }
        }
        if occupied != self.occupied_rooms {
            return Err(format!(
                "occupied_rooms {} but {occupied} rooms have members",
                self.occupied_rooms
            ));
        }
        if self.room_ids.len() != self.rooms.len() {
            return Err("name index and rooms differ in size".into());
        }
        Ok(())
    }
}
