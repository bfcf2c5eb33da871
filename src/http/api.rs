//! The server API's checks (PROTOCOL §6), once the route is an API endpoint
//! and the method is `POST`.

use super::query::{percent_decode, query_param};
use super::request::{Decision, HttpRoute, Policy, RejectReason, content_length, first_header};
use super::response::reject;
use super::route::Inspect;

/// The rooms `GET /api/rooms` lists without `limit` (§14.3).
pub(super) const DEFAULT_ROOM_LIST: usize = 1000;

/// The bearer key checks every API endpoint shares (§6, §14.3): a
/// configured key (`403`), then the presented one compared in constant time
/// (`401`).
pub(super) fn check_api_key(
    headers: &[httparse::Header<'_>],
    policy: &Policy<'_>,
) -> Result<(), RejectReason> {
    // An empty key is no key: it must never match a missing `Authorization`.
    let Some(key) = policy.api_key.filter(|key| !key.is_empty()) else {
        return Err(RejectReason::ApiDisabled);
    };
    // The scheme name is case-insensitive (RFC 9110 §11.1).
    let presented = first_header(headers, "authorization")
        .and_then(|value| {
            let (scheme, credentials) = value.split_at_checked(7)?;
            scheme
                .eq_ignore_ascii_case(b"bearer ")
                .then_some(credentials)
        })
        .unwrap_or_default();
    if !bool::from(subtle::ConstantTimeEq::ct_eq(presented, key.as_bytes())) {
        return Err(RejectReason::Unauthorized);
    }
    Ok(())
}

/// A query parameter that must be a non-negative integer (`limit`, `since`):
/// `Ok(None)` when absent, `Err` (a `400`) when it is anything else. A value
/// past `u64` is still a non-negative integer: it saturates.
pub(super) fn count_param(query: Option<&str>, key: &str) -> Result<Option<u64>, RejectReason> {
    let Some(raw) = query.and_then(|query| query_param(query, key)) else {
        return Ok(None);
    };
    let decoded = percent_decode(raw.as_bytes(), true).ok_or(RejectReason::BadRequest)?;
    if decoded.is_empty() || !decoded.iter().all(u8::is_ascii_digit) {
        return Err(RejectReason::BadRequest);
    }
    let value = decoded.iter().fold(0u64, |value, digit| {
        value
            .saturating_mul(10)
            .saturating_add(u64::from(digit - b'0'))
    });
    Ok(Some(value))
}

/// The introspection endpoint with its query read (§14.3): `prefix` (form
/// decoded, UTF-8), `limit` (default 1000, above 10000 clamped to 10000),
/// `since` (default 0); a bad value is a `400`.
pub(super) fn inspect_route(
    target: Inspect,
    query: Option<&str>,
) -> Result<HttpRoute, RejectReason> {
    Ok(match target {
        Inspect::Rooms => {
            let prefix = match query.and_then(|query| query_param(query, "prefix")) {
                None => String::new(),
                Some(raw) => percent_decode(raw.as_bytes(), true)
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                    .ok_or(RejectReason::BadRequest)?,
            };
            let limit = count_param(query, "limit")?.map_or(DEFAULT_ROOM_LIST, |limit| {
                usize::try_from(limit)
                    .map_or(crate::backplane::introspection::MAX_ROOM_LIST, |limit| {
                        limit.min(crate::backplane::introspection::MAX_ROOM_LIST)
                    })
            });
            HttpRoute::RoomList { prefix, limit }
        }
        Inspect::Room(room) => HttpRoute::Room { room },
        Inspect::History(room) => HttpRoute::RoomHistory {
            room,
            since: count_param(query, "since")?.unwrap_or(0),
        },
        Inspect::User(user) => HttpRoute::User { user },
    })
}

/// The server API's checks (§6): a configured key (`403`), the bearer key
/// compared in constant time (`401`), a body framed by `Content-Length` and no
/// larger than `--max-message-size` (`413`).
pub(super) fn decide_api(
    route: HttpRoute,
    headers: &[httparse::Header<'_>],
    head_len: usize,
    keep_alive: bool,
    policy: &Policy<'_>,
) -> Decision {
    if let Err(reason) = check_api_key(headers, policy) {
        return reject(reason);
    }
    if first_header(headers, "transfer-encoding").is_some() {
        // Only Content-Length framing is spoken here; chunked bodies are refused.
        return reject(RejectReason::BadRequest);
    }
    let Some(body_len) = content_length(headers) else {
        return reject(RejectReason::BadRequest);
    };
    if body_len > policy.max_body_bytes {
        return reject(RejectReason::PayloadTooLarge);
    }
    Decision::Serve {
        route,
        head_len,
        body_len,
        keep_alive,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::route::{Route, inspect_path};

    #[test]
    fn counts_are_non_negative_integers_or_absent() {
        assert_eq!(count_param(None, "limit"), Ok(None));
        assert_eq!(count_param(Some("a=1"), "limit"), Ok(None));
        assert_eq!(count_param(Some("limit=12"), "limit"), Ok(Some(12)));
        assert_eq!(count_param(Some("limit=%31"), "limit"), Ok(Some(1)));
        assert_eq!(
            count_param(Some("since=99999999999999999999999"), "since"),
            Ok(Some(u64::MAX))
        );
        for bad in ["limit=", "limit=-1", "limit=1.5", "limit=x", "limit=+1"] {
            assert_eq!(
                count_param(Some(bad), "limit"),
                Err(RejectReason::BadRequest),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_room_list_has_defaults_and_a_clamped_limit() {
        assert_eq!(
            inspect_route(Inspect::Rooms, None),
            Ok(HttpRoute::RoomList {
                prefix: String::new(),
                limit: DEFAULT_ROOM_LIST
            })
        );
        assert_eq!(
            inspect_route(Inspect::Rooms, Some("prefix=team%3A+x&limit=20000")),
            Ok(HttpRoute::RoomList {
                prefix: "team: x".into(),
                limit: 10_000
            })
        );
        assert_eq!(
            inspect_route(Inspect::Rooms, Some("prefix=%FF")),
            Err(RejectReason::BadRequest)
        );
        assert_eq!(
            inspect_route(Inspect::History("r".into()), None),
            Ok(HttpRoute::RoomHistory {
                room: "r".into(),
                since: 0
            })
        );
    }

    #[test]
    fn names_in_paths_are_one_decoded_segment() {
        let inspect = |path: &str| match inspect_path(path) {
            Some(Route::Inspect(target)) => Some(target),
            _ => None,
        };
        assert_eq!(
            inspect("/api/rooms/team%3Aa"),
            Some(Inspect::Room("team:a".into()))
        );
        assert_eq!(
            inspect("/api/rooms/a/history"),
            Some(Inspect::History("a".into()))
        );
        assert_eq!(
            inspect("/api/users/a%20b"),
            Some(Inspect::User("a b".into()))
        );
        // Not UTF-8: an empty name, which is no room.
        assert_eq!(
            inspect("/api/rooms/%FF"),
            Some(Inspect::Room(String::new()))
        );
        for unknown in [
            "/api/rooms/",
            "/api/rooms/a/b",
            "/api/rooms//history",
            "/api/users/",
            "/api/users/a/b",
            "/api/other",
        ] {
            assert_eq!(inspect(unknown), None, "{unknown}");
        }
    }
}
