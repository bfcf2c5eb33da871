//! The server API's checks (PROTOCOL §6), once the route is an API endpoint
//! and the method is `POST`.

use super::request::{Decision, HttpRoute, Policy, RejectReason, content_length, first_header};
use super::response::reject;

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
    // An empty key is no key: it must never match a missing `Authorization`.
    let Some(key) = policy.api_key.filter(|key| !key.is_empty()) else {
        return reject(RejectReason::ApiDisabled);
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
        return reject(RejectReason::Unauthorized);
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
