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
            | Route::Plain(_) => "GET",
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
