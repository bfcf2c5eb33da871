//! Namespaces (PROTOCOL §14.1): options for the rooms whose name starts
//! with a prefix, the longest matching prefix winning.
//!
//! The rules look a room's options up once where they act on them (a
//! publish, a join, a member leaving), so a server without namespaces pays
//! one empty scan and nothing else.

/// What a namespace sets for its rooms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomOptions {
    /// False: a client `message` is refused with `forbidden` (`/api/publish` still works).
    pub client_publish: bool,
    /// Messages each room keeps for recovery.
    pub history: usize,
    /// False: members get no `user_joined` / `user_left`.
    pub member_events: bool,
    /// Above 0: most users in a room; one more gets `room_full`.
    pub max_members: u64,
    /// True: every client `message` is also a webhook event.
    pub webhook_messages: bool,
}

impl RoomOptions {
    /// The options of a room in no namespace, with `--history` messages kept.
    pub fn defaults(history: usize) -> Self {
        RoomOptions {
            client_publish: true,
            history,
            member_events: true,
            max_members: 0,
            webhook_messages: false,
        }
    }

    /// Whether a room already holding `users` users (the joiner not among
    /// them) has room for one more.
    pub fn admits(&self, users: u64) -> bool {
        self.max_members == 0 || users < self.max_members
    }
}

/// One `[[namespace]]` as the config file gives it: unset options follow
/// the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    /// The rooms it covers: those whose name starts with this.
    pub prefix: String,
    /// See [`RoomOptions::client_publish`].
    pub client_publish: Option<bool>,
    /// See [`RoomOptions::history`]; default `--history`.
    pub history: Option<usize>,
    /// See [`RoomOptions::member_events`].
    pub member_events: Option<bool>,
    /// See [`RoomOptions::max_members`].
    pub max_members: Option<u64>,
    /// See [`RoomOptions::webhook_messages`].
    pub webhook_messages: Option<bool>,
}

/// Every namespace, and the options of rooms in none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespaces {
    defaults: RoomOptions,
    /// Longest prefix first, so the first match is the one that wins.
    by_prefix: Vec<(Box<str>, RoomOptions)>,
}

impl Namespaces {
    /// No namespaces: every room has the defaults.
    pub fn none(history: usize) -> Self {
        Namespaces {
            defaults: RoomOptions::defaults(history),
            by_prefix: Vec::new(),
        }
    }

    /// The namespaces of the config file over the defaults of the flags.
    pub fn new(defaults: RoomOptions, specs: &[NamespaceSpec]) -> Self {
        let mut by_prefix: Vec<(Box<str>, RoomOptions)> = specs
            .iter()
            .map(|spec| {
                let options = RoomOptions {
                    client_publish: spec.client_publish.unwrap_or(defaults.client_publish),
                    history: spec.history.unwrap_or(defaults.history),
                    member_events: spec.member_events.unwrap_or(defaults.member_events),
                    max_members: spec.max_members.unwrap_or(defaults.max_members),
                    webhook_messages: spec.webhook_messages.unwrap_or(defaults.webhook_messages),
                };
                (spec.prefix.as_str().into(), options)
            })
            .collect();
        by_prefix.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Namespaces {
            defaults,
            by_prefix,
        }
    }

    /// The options of `room`: its longest matching namespace's, or the defaults.
    pub fn for_room(&self, room: &str) -> &RoomOptions {
        self.by_prefix
            .iter()
            .find(|(prefix, _)| room.starts_with(&**prefix))
            .map_or(&self.defaults, |(_, options)| options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(prefix: &str) -> NamespaceSpec {
        NamespaceSpec {
            prefix: prefix.into(),
            ..NamespaceSpec::default()
        }
    }

    #[test]
    fn the_longest_matching_prefix_wins_whatever_the_order() {
        let namespaces = Namespaces::new(
            RoomOptions::defaults(100),
            &[
                NamespaceSpec {
                    history: Some(5),
                    ..spec("news:")
                },
                NamespaceSpec {
                    history: Some(7),
                    ..spec("news:local:")
                },
            ],
        );
        assert_eq!(namespaces.for_room("news:local:paris").history, 7);
        assert_eq!(namespaces.for_room("news:world").history, 5);
        assert_eq!(namespaces.for_room("chat").history, 100);
    }

    #[test]
    fn unset_options_follow_the_defaults() {
        let namespaces = Namespaces::new(
            RoomOptions::defaults(42),
            &[NamespaceSpec {
                client_publish: Some(false),
                ..spec("feed:")
            }],
        );
        let options = namespaces.for_room("feed:x");
        assert!(!options.client_publish);
        assert_eq!(options.history, 42);
        assert!(options.member_events);
        assert_eq!(options.max_members, 0);
    }

    #[test]
    fn max_members_counts_the_users_already_in() {
        let mut options = RoomOptions::defaults(1);
        assert!(options.admits(1_000_000));
        options.max_members = 2;
        assert!(options.admits(1));
        assert!(!options.admits(2));
    }
}
