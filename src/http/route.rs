//! The route table: where a request goes, before method and headers are
//! looked at, and the one method each endpoint answers.

use super::query::percent_decode;
use super::request::{HttpRoute, Policy, RejectReason};

/// Where a request goes, before method and headers are looked at.
pub(super) enum Route {
    /// `/ws` or `/ws/{room}` (room already percent-decoded).
    Rooms(Option<String>),
    /// `/echo`.
    Echo,
    /// `/health`.
    Health,
    /// `/demo/token`.
    DemoToken,
    /// `/token/check`.
    TokenCheck,
    /// A plain `GET` endpoint answered from server state.
    Plain(HttpRoute),
    /// A `POST` endpoint of the server API.
    Api(HttpRoute),
    /// A `GET` endpoint of the introspection API (§14.3).
    Inspect(Inspect),
}

/// A `GET` endpoint of the introspection API, with the name in its path
/// percent-decoded; its query is read once the key is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Inspect {
    /// `/api/rooms`.
    Rooms,
    /// `/api/rooms/{room}`.
    Room(String),
    /// `/api/rooms/{room}/history`.
    History(String),
    /// `/api/users/{user}`.
    User(String),
}

impl Route {
    /// The one method each endpoint answers; also the `Allow` header of a 405.
    pub(super) fn method(&self) -> &'static str {
        match self {
            Route::Rooms(_)
            | Route::Echo
            | Route::Health
            | Route::DemoToken
            | Route::TokenCheck
            | Route::Plain(_)
            | Route::Inspect(_) => "GET",
            Route::Api(_) => "POST",
        }
    }
}

/// The route table. `Err` is the refusal: `404` for unknown (or switched-off)
/// paths, `400` for a room segment that does not decode.
pub(super) fn route(path: &str, policy: &Policy<'_>) -> Result<Route, RejectReason> {
    match path {
        "/ws" => Ok(Route::Rooms(None)),
        "/health" => Ok(Route::Health),
        "/echo" if policy.echo_enabled => Ok(Route::Echo),
        "/demo/token" if policy.demo_mode => Ok(Route::DemoToken),
        "/token/check" => Ok(Route::TokenCheck),
        "/" => Ok(Route::Plain(HttpRoute::Page)),
        "/roomcast.js" => Ok(Route::Plain(HttpRoute::ClientScript)),
        "/metrics" => Ok(Route::Plain(HttpRoute::Metrics)),
        "/api/stats" => Ok(Route::Plain(HttpRoute::Stats)),
        "/api/publish" => Ok(Route::Api(HttpRoute::Publish)),
        "/api/disconnect" => Ok(Route::Api(HttpRoute::Disconnect)),
        "/api/subscribe" => Ok(Route::Api(HttpRoute::Subscribe)),
        "/api/unsubscribe" => Ok(Route::Api(HttpRoute::Unsubscribe)),
        "/api/rooms" => Ok(Route::Inspect(Inspect::Rooms)),
        _ if path.starts_with("/api/") => inspect_path(path).ok_or(RejectReason::NotFound),
        _ => match path.strip_prefix("/ws/") {
            // Exactly one non-empty segment: `/ws/` and `/ws/a/b` are unknown.
            Some(room) if !room.is_empty() && !room.contains('/') => {
                let decoded =
                    percent_decode(room.as_bytes(), false).ok_or(RejectReason::BadRequest)?;
                let room = String::from_utf8(decoded).map_err(|_| RejectReason::BadRequest)?;
                Ok(Route::Rooms(Some(room)))
            }
            _ => Err(RejectReason::NotFound),
        },
    }
}

/// `/api/rooms/{room}`, `/api/rooms/{room}/history` and `/api/users/{user}`:
/// one non-empty segment, percent-decoded; `None` for any other path.
///
/// A room segment that does not decode to UTF-8 becomes an empty name, which
/// is not valid and so answers `404 no_room` like every unknown room.
pub(super) fn inspect_path(path: &str) -> Option<Route> {
    let segment = |raw: &str| -> Option<String> {
        if raw.is_empty() || raw.contains('/') {
            return None;
        }
        let decoded = percent_decode(raw.as_bytes(), false)?;
        Some(String::from_utf8(decoded).unwrap_or_default())
    };
    if let Some(user) = path.strip_prefix("/api/users/") {
        return segment(user).map(|user| Route::Inspect(Inspect::User(user)));
    }
    let rest = path.strip_prefix("/api/rooms/")?;
    match rest.strip_suffix("/history") {
        Some(room) => segment(room).map(|room| Route::Inspect(Inspect::History(room))),
        None => segment(rest).map(|room| Route::Inspect(Inspect::Room(room))),
    }
}
