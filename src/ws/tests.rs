//! Unit tests of the upgrade checks: the upgrade headers and the key, the
//! `101`, origin, capacity, and where the token comes from.

use serde_json::json;

use super::{Endpoint, TokenCheck};
use crate::http::test_support::*;
use crate::http::{Decision, HttpRoute, RejectReason};

fn token_check_of(request: &str) -> TokenCheck {
    match Setup::new().decide(request) {
        Decision::Serve {
            route: HttpRoute::TokenCheck(check),
            ..
        } => check,
        other => panic!("expected a token check, got {other:?}"),
    }
}

#[test]
fn token_check_predicts_the_upgrade() {
    let valid = token_check_of(&raw(
        "GET",
        &format!("/token/check?token={}", token_for("u1")),
        "",
    ));
    assert_eq!(
        valid,
        TokenCheck::Valid {
            user_id: "u1".into(),
            name: "Test".into(),
            expires_at: Some(NOW + 3600),
        }
    );
    assert_eq!(valid.answer().0, 200);
    let expired = sign(SECRET, json!({"sub": "u1", "exp": NOW}));
    for (target, headers, code) in [
        ("/token/check".to_string(), "", "missing"),
        ("/token/check?token=".to_string(), "", "missing"),
        ("/token/check?token=x.y".to_string(), "", "malformed"),
        (
            format!(
                "/token/check?token={}",
                sign(b"other", json!({"sub": "u1"}))
            ),
            "",
            "bad_signature",
        ),
        (format!("/token/check?token={expired}"), "", "expired"),
        (
            "/token/check".to_string(),
            "Cookie: roomcast_token=nope\r\n",
            "malformed",
        ),
    ] {
        let check = token_check_of(&raw("GET", &target, headers));
        assert_eq!(check, TokenCheck::Refused(code), "{target}");
        assert_eq!(check.answer(), (401, format!(r#"{{"error":"{code}"}}"#)));
        // The same token on an upgrade is refused.
        let upgrade = ws(&target.replacen("/token/check", "/ws", 1), headers);
        assert_reject(&Setup::new().decide(&upgrade), RejectReason::Unauthorized);
    }
}

#[test]
fn connection_without_the_upgrade_token_is_a_plain_get() {
    let setup = Setup::new();
    for headers in ["Connection: close\r\n", "Connection: keep-alive\r\n"] {
        assert_reject(
            &setup.decide(&raw("GET", "/ws", headers)),
            RejectReason::UpgradeRequired,
        );
    }
    let upgrade_only = "Upgrade: websocket\r\nConnection: keep-alive\r\n";
    assert_reject(
        &setup.decide(&raw("GET", "/ws", upgrade_only)),
        RejectReason::BadRequest,
    );
}

#[test]
fn a_repeated_key_is_refused() {
    let request = ws_token("/ws", &format!("Sec-WebSocket-Key: {SAMPLE_KEY}\r\n"));
    assert_reject(&Setup::new().decide(&request), RejectReason::BadRequest);
}

/// RFC 6455 §1.3's worked example. (The value is the RFC's and matches
/// base64(SHA-1(key + GUID)).)
#[test]
fn accept_key_matches_rfc_6455_sample() {
    let setup = Setup::new();
    let (response, identity, endpoint, head_len) =
        expect_upgrade(setup.decide(&ws_token("/ws", "")));
    assert_eq!(
        String::from_utf8(response).unwrap(),
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    );
    assert_eq!(identity.user_id, "u1");
    assert_eq!(endpoint, Endpoint::Rooms { join: None });
    assert_eq!(head_len, ws_token("/ws", "").len());
}

#[test]
fn upgrade_header_rules() {
    let setup = Setup::new();
    let token = token_for("u1");
    let target = format!("/ws?token={token}");
    let key = format!("Sec-WebSocket-Key: {SAMPLE_KEY}\r\n");
    let version = "Sec-WebSocket-Version: 13\r\n";
    let both = "Upgrade: websocket\r\nConnection: Upgrade\r\n";
    let case = |headers: String| setup.decide(&raw("GET", &target, &headers));

    let decision = case(format!("{key}{version}"));
    assert_reject(&decision, RejectReason::UpgradeRequired);
    let text = response_text(&decision);
    assert!(
        text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
        "{text}"
    );
    assert!(text.contains("\r\nUpgrade: websocket\r\n"), "{text}");

    for headers in [
        format!("Upgrade: websocket\r\n{key}{version}"),
        format!("Connection: Upgrade\r\n{key}{version}"),
        format!("Upgrade: h2c\r\nConnection: Upgrade\r\n{key}{version}"),
        format!("Upgrade: websocket\r\nConnection: keep-alive\r\n{key}{version}"),
        format!("Upgrade: websocket\r\nConnection: upgrade-ish\r\n{key}{version}"),
        format!("{both}{version}"),
        format!("{both}{key}"),
        format!("{both}Sec-WebSocket-Key: c2hvcnQ=\r\n{version}"),
        format!("{both}Sec-WebSocket-Key: not base64 at all!!!!!!!\r\n{version}"),
        format!("{both}Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ\r\n{version}"),
        format!("{both}Sec-WebSocket-Key: \r\n{version}"),
    ] {
        assert_reject(&case(headers.clone()), RejectReason::BadRequest);
    }

    let decision = case(format!("{both}{key}Sec-WebSocket-Version: 8\r\n"));
    assert_reject(&decision, RejectReason::Version);
    let text = response_text(&decision);
    assert!(text.starts_with("HTTP/1.1 426 "), "{text}");
    assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{text}");

    // Case-insensitive names and tokens, lists, and split list headers.
    for headers in [
        format!("upgrade: WebSocket\r\nCONNECTION: keep-alive, Upgrade\r\n{key}{version}"),
        format!(
            "Upgrade: websocket\r\nConnection: keep-alive\r\nConnection: upgrade\r\n{key}{version}"
        ),
        format!("{both}sec-websocket-key:   {SAMPLE_KEY}  \r\nsec-websocket-version: 13\r\n"),
    ] {
        expect_upgrade(case(headers));
    }

    // HTTP/1.0 cannot upgrade.
    let old = ws_token("/ws", "").replacen("HTTP/1.1", "HTTP/1.0", 1);
    assert_reject(&setup.decide(&old), RejectReason::BadRequest);
}

#[test]
fn origin_rules() {
    let mut setup = Setup::new();
    expect_upgrade(setup.decide(&ws_token("/ws", "Origin: https://any.example\r\n")));
    setup.origins = vec!["https://a.example".into(), "https://b.example".into()];
    expect_upgrade(setup.decide(&ws_token("/ws", "")));
    expect_upgrade(setup.decide(&ws_token("/ws", "Origin: https://b.example\r\n")));
    for origin in ["https://c.example", "https://B.example", "null", ""] {
        assert_reject(
            &setup.decide(&ws_token("/ws", &format!("Origin: {origin}\r\n"))),
            RejectReason::Origin,
        );
    }
}

#[test]
fn capacity() {
    let mut setup = Setup::new();
    setup.max_connections = 2;
    setup.open_connections = 1;
    expect_upgrade(setup.decide(&ws_token("/ws", "")));
    setup.open_connections = 2;
    assert_reject(&setup.decide(&ws_token("/ws", "")), RejectReason::Capacity);
}

#[test]
fn token_sources() {
    let setup = Setup::new();
    let good = token_for("cookie-user");
    let query_good = token_for("query-user");
    let forged = sign(b"another secret", json!({"sub": "u1"}));
    let expired = sign(SECRET, json!({"sub": "u1", "exp": NOW - 1}));

    // Cookie among others, across several Cookie lines, quoted or not.
    for cookies in [
        format!("Cookie: a=1; roomcast_token={good}; b=2\r\n"),
        format!("Cookie: a=1\r\nCookie: roomcast_token=\"{good}\"\r\n"),
        format!("Cookie: roomcast_token={good};roomcast_token=junk\r\n"),
    ] {
        let (_, identity, _, _) = expect_upgrade(setup.decide(&ws("/ws", &cookies)));
        assert_eq!(identity.user_id, "cookie-user");
    }

    // The query wins over the cookie, both ways.
    let cookie = format!("Cookie: roomcast_token={good}\r\n");
    let (_, identity, _, _) =
        expect_upgrade(setup.decide(&ws(&format!("/ws?token={query_good}"), &cookie)));
    assert_eq!(identity.user_id, "query-user");
    for query in [
        format!("token={forged}"),
        "token=".to_string(),
        "token".to_string(),
        "token=%FF".to_string(),
    ] {
        assert_reject(
            &setup.decide(&ws(&format!("/ws?{query}"), &cookie)),
            RejectReason::Unauthorized,
        );
    }

    // First `token` parameter wins; other parameters are ignored.
    let (_, identity, _, _) = expect_upgrade(setup.decide(&ws(
        &format!("/ws/room?a=b&token={query_good}&token=junk"),
        "",
    )));
    assert_eq!(identity.user_id, "query-user");

    for request in [
        ws("/ws", ""),
        ws("/ws", "Cookie: other=1\r\n"),
        ws("/ws?tokens=x", ""),
        ws(&format!("/ws?token={expired}"), ""),
        ws(&format!("/ws?token={forged}"), ""),
        ws("/ws?token=not.a.jwt", ""),
        ws("/ws", &format!("Cookie: roomcast_token={forged}\r\n")),
    ] {
        let decision = setup.decide(&request);
        assert_reject(&decision, RejectReason::Unauthorized);
        assert!(response_text(&decision).starts_with("HTTP/1.1 401 Unauthorized\r\n"));
    }
}
