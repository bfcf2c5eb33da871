//! Unit tests of the request head: parsing, the size cap, routes, methods,
//! the §11 check order, the server API, response framing, percent-decoding.

use super::query::{percent_decode, percent_well_formed};
use super::test_support::*;
use super::{Decision, Endpoint, HttpRoute, MAX_HEAD_BYTES, RejectReason, decide, response};

/// Comparable summary of a decision (Decision itself has no PartialEq).
fn summary(decision: &Option<Decision>) -> String {
    match decision {
        None => "incomplete".to_string(),
        Some(Decision::Upgrade {
            response,
            identity,
            endpoint,
            head_len,
        }) => format!(
            "upgrade {} {endpoint:?} {head_len} {}",
            identity.user_id,
            String::from_utf8_lossy(response)
        ),
        Some(Decision::Serve {
            route, head_len, ..
        }) => format!("serve {route:?} {head_len}"),
        Some(Decision::Reject { reason, response }) => {
            format!("reject {reason:?} {}", String::from_utf8_lossy(response))
        }
    }
}

#[test]
fn an_empty_api_key_is_no_key() {
    let mut setup = Setup::new();
    setup.api_key = Some(String::new());
    let publish = raw("POST", "/api/publish", "Content-Length: 0\r\n");
    assert_reject(&setup.decide(&publish), RejectReason::ApiDisabled);
}

#[test]
fn labels_statuses_and_all_are_consistent() {
    let labels: Vec<&str> = RejectReason::ALL.iter().map(|r| r.label()).collect();
    assert_eq!(
        labels,
        [
            "too_large",
            "bad_request",
            "not_found",
            "method",
            "upgrade_required",
            "version",
            "origin",
            "capacity",
            "unauthorized",
            "timeout",
            "api_disabled",
            "payload_too_large",
            "user_limit"
        ]
    );
    let statuses: Vec<u16> = RejectReason::ALL.iter().map(|r| r.status()).collect();
    assert_eq!(
        statuses,
        [
            431, 400, 404, 405, 426, 426, 403, 503, 401, 408, 403, 413, 429
        ]
    );
}

#[test]
fn partial_heads_need_more_bytes() {
    let setup = Setup::new();
    let request = ws_token("/ws", "");
    for end in 0..request.len() {
        assert!(
            decide(&request.as_bytes()[..end], &setup.policy()).is_none(),
            "prefix of {end} bytes"
        );
    }
}

#[test]
fn split_heads_decide_like_whole_ones() {
    let mut setup = Setup::new();
    setup.demo_mode = true;
    let requests = [
        ws_token("/ws/lobby", ""),
        ws_token("/ws", "Origin: https://x\r\n"),
        ws("/ws", ""),
        raw("GET", "/ws", ""),
        raw("GET", "/health", ""),
        raw("GET", "/demo/token?name=A+B", ""),
        raw("POST", "/ws", ""),
        raw("GET", "/nope", ""),
        "GET /ws HTTP/1.1\r\nBroken header\r\n\r\n".to_string(),
        "\x16\x03\x01\x02\x00garbage".to_string(),
        format!("GET /ws HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000)),
    ];
    for request in &requests {
        let bytes = request.as_bytes();
        let whole = summary(&decide(bytes, &setup.policy()));
        for split in 0..=bytes.len() {
            let first = decide(&bytes[..split], &setup.policy());
            let seen = if first.is_some() {
                summary(&first)
            } else {
                summary(&decide(bytes, &setup.policy()))
            };
            assert_eq!(seen, whole, "split at {split} of {request:?}");
        }
    }
}

#[test]
fn bytes_after_the_head_are_left_for_the_frame_parser() {
    let setup = Setup::new();
    let request = ws_token("/ws", "");
    let mut buffer = request.clone().into_bytes();
    buffer.extend_from_slice(b"\x81\x85abcd\x00\x00\x00\x00\x00");
    let decision = decide(&buffer, &setup.policy()).unwrap();
    let (_, _, _, head_len) = expect_upgrade(decision);
    assert_eq!(head_len, request.len());

    let mut buffer = raw("GET", "/health", "").into_bytes();
    let len = buffer.len();
    buffer.extend_from_slice(b"GET /health HTTP/1.1\r\n");
    match decide(&buffer, &setup.policy()) {
        Some(Decision::Serve {
            route: HttpRoute::Health,
            head_len,
            ..
        }) => assert_eq!(head_len, len),
        other => panic!("{other:?}"),
    }
}

#[test]
fn server_api_checks_key_then_body_size() {
    let mut setup = Setup::new();
    let publish = |headers: &str| raw("POST", "/api/publish", headers);
    assert_reject(
        &setup.decide(&publish("Authorization: Bearer k\r\n")),
        RejectReason::ApiDisabled,
    );
    setup.api_key = Some("k".into());
    assert_reject(&setup.decide(&publish("")), RejectReason::Unauthorized);
    assert_reject(
        &setup.decide(&publish("Authorization: Bearer wrong\r\n")),
        RejectReason::Unauthorized,
    );
    assert_reject(
        &setup.decide(&publish(
            "Authorization: Bearer k\r\nContent-Length: 1025\r\n",
        )),
        RejectReason::PayloadTooLarge,
    );
    assert_reject(
        &setup.decide(&publish("Authorization: Bearer k\r\nContent-Length: x\r\n")),
        RejectReason::BadRequest,
    );
    assert_reject(
        &setup.decide(&publish(
            "Authorization: Bearer k\r\nTransfer-Encoding: chunked\r\n",
        )),
        RejectReason::BadRequest,
    );
    match setup.decide(&publish(
        "Authorization: Bearer k\r\nContent-Length: 12\r\n",
    )) {
        Decision::Serve {
            route: HttpRoute::Publish,
            body_len: 12,
            keep_alive: true,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    match setup.decide(&raw(
        "POST",
        "/api/disconnect",
        "Authorization: Bearer k\r\nConnection: close\r\n",
    )) {
        Decision::Serve {
            route: HttpRoute::Disconnect,
            body_len: 0,
            keep_alive: false,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    assert_reject(
        &setup.decide(&raw("GET", "/api/publish", "")),
        RejectReason::Method,
    );
    for (target, route) in [
        ("/", HttpRoute::Page),
        ("/roomcast.js", HttpRoute::ClientScript),
        ("/metrics", HttpRoute::Metrics),
        ("/api/stats", HttpRoute::Stats),
    ] {
        match setup.decide(&raw("GET", target, "")) {
            Decision::Serve { route: got, .. } => assert_eq!(got, route),
            other => panic!("{target}: {other:?}"),
        }
    }
}

#[test]
fn malformed_requests_are_400() {
    let setup = Setup::new();
    for request in [
        "GET /ws HTTP/1.1\r\nNo colon here\r\n\r\n",
        "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03",
        "GET /ws HTTP/2.0\r\n\r\n",
        "GET  /ws HTTP/1.1\r\n\r\n",
        "GET /ws\r\n\r\n",
        "GET /ws?token=%zz HTTP/1.1\r\n\r\n",
        "GET /ws/%4 HTTP/1.1\r\n\r\n",
        "GET /nowhere?x=%g0 HTTP/1.1\r\n\r\n",
        "GET /ws/%FF%FE HTTP/1.1\r\n\r\n",
    ] {
        assert_reject(&setup.decide(request), RejectReason::BadRequest);
    }
    // Non-UTF-8 bytes in the request target.
    let decision = decide(b"GET /ws\xff HTTP/1.1\r\n\r\n", &setup.policy()).unwrap();
    assert_reject(&decision, RejectReason::BadRequest);
}

#[test]
fn head_size_limit() {
    let setup = Setup::new();
    // A complete head of exactly MAX_HEAD_BYTES is fine...
    let filler = |total: usize| {
        let base = ws_token("/ws", "X-Pad: \r\n").len();
        ws_token("/ws", &format!("X-Pad: {}\r\n", "p".repeat(total - base)))
    };
    let exact = filler(MAX_HEAD_BYTES);
    assert_eq!(exact.len(), MAX_HEAD_BYTES);
    expect_upgrade(setup.decide(&exact));
    // ...one byte more is 431.
    let over = filler(MAX_HEAD_BYTES + 1);
    assert_eq!(over.len(), MAX_HEAD_BYTES + 1);
    assert_reject(&setup.decide(&over), RejectReason::TooLarge);
    // An incomplete head: 8192 bytes may still end well, 8193 cannot.
    let endless = "GET /ws HTTP/1.1\r\nX-Pad: ".to_string() + &"p".repeat(10_000);
    assert!(decide(&endless.as_bytes()[..MAX_HEAD_BYTES], &setup.policy()).is_none());
    let decision = decide(&endless.as_bytes()[..MAX_HEAD_BYTES + 1], &setup.policy());
    assert_reject(&decision.unwrap(), RejectReason::TooLarge);
    // Too many header lines is also "too large".
    let many: String = (0..70).map(|i| format!("X-{i}: v\r\n")).collect();
    assert_reject(
        &setup.decide(&ws_token("/ws", &many)),
        RejectReason::TooLarge,
    );
    // The 431 carries Connection: close.
    assert!(response_text(&setup.decide(&over)).starts_with("HTTP/1.1 431 "));
}

#[test]
fn check_order_matches_the_protocol() {
    let mut setup = Setup::new();
    // Oversize head with a bad path → 431.
    let big = format!("X-Pad: {}\r\n", "p".repeat(9000));
    assert_reject(
        &setup.decide(&raw("POST", "/nope", &big)),
        RejectReason::TooLarge,
    );
    // Malformed and unknown → 400.
    assert_reject(
        &setup.decide(&raw("POST", "/nope%", "")),
        RejectReason::BadRequest,
    );
    // Bad path with bad method → 404.
    assert_reject(
        &setup.decide(&raw("POST", "/nope", "")),
        RejectReason::NotFound,
    );
    // Wrong method on /ws with no upgrade headers → 405.
    assert_reject(&setup.decide(&raw("POST", "/ws", "")), RejectReason::Method);
    // No upgrade headers and a bad version → 426 upgrade_required.
    assert_reject(
        &setup.decide(&raw("GET", "/ws", "Sec-WebSocket-Version: 8\r\n")),
        RejectReason::UpgradeRequired,
    );
    // Missing key and a bad version → 400.
    assert_reject(
        &setup.decide(&raw(
            "GET",
            "/ws",
            "Upgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Version: 8\r\n",
        )),
        RejectReason::BadRequest,
    );
    setup.origins = vec!["https://good.example".into()];
    setup.open_connections = 10;
    // Bad version and bad origin → 426 version.
    let bad_version =
        ws_token("/ws", "Origin: https://evil.example\r\n").replace("Version: 13", "Version: 8");
    assert_reject(&setup.decide(&bad_version), RejectReason::Version);
    // Bad origin and capacity full → 403.
    assert_reject(
        &setup.decide(&ws_token("/ws", "Origin: https://evil.example\r\n")),
        RejectReason::Origin,
    );
    // Capacity full and no token → 503.
    assert_reject(&setup.decide(&ws("/ws", "")), RejectReason::Capacity);
    setup.open_connections = 9;
    assert_reject(&setup.decide(&ws("/ws", "")), RejectReason::Unauthorized);
}

#[test]
fn routes() {
    let mut setup = Setup::new();
    for target in [
        "/wsx",
        "/ws/",
        "/ws/a/b",
        "/ws//",
        "/metricsx",
        "/api/statsx",
        "/echo",
        "/demo/token",
        "*",
        "http://localhost/ws",
        "/w\u{e9}",
    ] {
        assert_reject(&setup.decide(&ws_token(target, "")), RejectReason::NotFound);
        assert_reject(
            &setup.decide(&raw("POST", target, "")),
            RejectReason::NotFound,
        );
    }
    // Percent-encoded room, `+` kept literally in the path.
    let (_, _, endpoint, _) = expect_upgrade(setup.decide(&ws_token("/ws/caf%C3%A9+x", "")));
    assert_eq!(
        endpoint,
        Endpoint::Rooms {
            join: Some("café+x".into())
        }
    );
    // An encoded slash is part of the name; the hub validates it.
    let (_, _, endpoint, _) = expect_upgrade(setup.decide(&ws_token("/ws/a%2Fb", "")));
    assert_eq!(
        endpoint,
        Endpoint::Rooms {
            join: Some("a/b".into())
        }
    );
    // Echo only when enabled.
    setup.echo_enabled = true;
    let (_, _, endpoint, _) = expect_upgrade(setup.decide(&ws_token("/echo", "")));
    assert_eq!(endpoint, Endpoint::Echo);
    assert_reject(
        &setup.decide(&raw("GET", "/echo", "")),
        RejectReason::UpgradeRequired,
    );
    // Demo token only in demo mode.
    setup.demo_mode = true;
    match setup.decide(&raw("GET", "/demo/token?x=1&name=Ann+Lee%21&name=Z", "")) {
        Decision::Serve {
            route: HttpRoute::DemoToken { name },
            ..
        } => assert_eq!(name.as_deref(), Some("Ann Lee!")),
        other => panic!("{other:?}"),
    }
    for target in ["/demo/token", "/demo/token?name=", "/demo/token?other=1"] {
        match setup.decide(&raw("GET", target, "")) {
            Decision::Serve {
                route: HttpRoute::DemoToken { name: None },
                ..
            } => {}
            other => panic!("{target}: {other:?}"),
        }
    }
    assert_reject(
        &setup.decide(&raw("GET", "/demo/token?name=%C3", "")),
        RejectReason::BadRequest,
    );
    assert_reject(
        &setup.decide(&raw("POST", "/demo/token", "")),
        RejectReason::Method,
    );
}

#[test]
fn plain_endpoints() {
    let setup = Setup::new();
    for request in [
        raw("GET", "/health", ""),
        raw("GET", "/health?x=1", ""),
        ws("/health", ""),
        "GET /health HTTP/1.0\r\n\r\n".to_string(),
    ] {
        match setup.decide(&request) {
            Decision::Serve {
                route: HttpRoute::Health,
                head_len,
                ..
            } => assert_eq!(head_len, request.len()),
            other => panic!("{request:?}: {other:?}"),
        }
    }
    for method in ["POST", "HEAD", "PUT", "get"] {
        let decision = setup.decide(&raw(method, "/health", ""));
        assert_reject(&decision, RejectReason::Method);
        assert!(response_text(&decision).contains("\r\nAllow: GET\r\n"));
    }
}

#[test]
fn a_refused_head_request_gets_headers_without_a_body() {
    let setup = Setup::new();
    for (target, reason) in [
        ("/health", RejectReason::Method),
        ("/ws", RejectReason::Method),
        ("/nowhere", RejectReason::NotFound),
    ] {
        let decision = setup.decide(&raw("HEAD", target, ""));
        assert_reject(&decision, reason);
        let text = response_text(&decision);
        assert!(text.ends_with("\r\n\r\n"), "{target}: {text:?}");
        let with_body = response_text(&setup.decide(&raw("PUT", target, "")));
        let length = |text: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix("Content-Length: "))
                .map(str::to_string)
        };
        assert_eq!(length(&text), length(&with_body), "{target}");
    }
}

#[test]
fn refusals_are_well_framed_and_close() {
    let mut setup = Setup::new();
    setup.origins = vec!["https://a.example".into()];
    for request in [
        raw("GET", "/nope", ""),
        raw("POST", "/ws", ""),
        raw("GET", "/ws", ""),
        ws("/ws", "Origin: https://z.example\r\n"),
        ws("/ws", ""),
        "GET /ws HTTP/1.1\r\nbad\r\n\r\n".to_string(),
    ] {
        let text = response_text(&setup.decide(&request));
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("\r\nConnection: close"), "{head}");
        assert!(
            head.contains("\r\nContent-Type: text/plain; charset=utf-8"),
            "{head}"
        );
        assert!(
            head.contains(&format!("\r\nContent-Length: {}", body.len())),
            "{head}"
        );
        assert!(body.ends_with('\n') && !body.is_empty());
    }
}

#[test]
fn response_builder() {
    let built = response(
        200,
        "application/json",
        br#"{"status":"ok"}"#,
        &[
            ("Cache-Control", "no-store"),
            ("X-Evil", "a\r\nSet-Cookie: x"),
        ],
    );
    assert_eq!(
        String::from_utf8(built).unwrap(),
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\
         Connection: close\r\nCache-Control: no-store\r\nX-Evil: aSet-Cookie: x\r\n\r\n\
         {\"status\":\"ok\"}"
    );
    let odd = String::from_utf8(response(299, "text/plain", b"", &[])).unwrap();
    assert!(odd.starts_with("HTTP/1.1 299 \r\n"));
}

#[test]
fn percent_decoding() {
    assert_eq!(percent_decode(b"a%20b+c", false).unwrap(), b"a b+c");
    assert_eq!(percent_decode(b"a%20b+c", true).unwrap(), b"a b c");
    assert_eq!(percent_decode(b"%e2%82%AC", false).unwrap(), "€".as_bytes());
    for bad in [&b"%"[..], b"%4", b"%4g", b"%%", b"abc%"] {
        assert!(percent_decode(bad, false).is_none());
        assert!(!percent_well_formed(bad));
    }
    assert!(percent_well_formed(b"/ws/a%2Fb?x=%41"));
}

#[test]
fn arbitrary_bytes_never_panic() {
    let mut setup = Setup::new();
    setup.echo_enabled = true;
    setup.demo_mode = true;
    let seeds = [
        ws_token("/ws/room", "Cookie: a=b; roomcast_token=x\r\nOrigin: o\r\n"),
        raw("GET", "/demo/token?name=%41+b&token", ""),
    ];
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let alphabet = b"%+?&=;/\r\n: \"\xff\x00aZ09,";
    for seed in &seeds {
        for _ in 0..3000 {
            let mut bytes = seed.clone().into_bytes();
            for _ in 0..(next() % 6 + 1) {
                let at = (next() as usize) % bytes.len();
                let symbol = alphabet[(next() as usize) % alphabet.len()];
                match next() % 3 {
                    0 => bytes[at] = symbol,
                    1 => bytes.insert(at, symbol),
                    _ => {
                        bytes.remove(at);
                    }
                }
            }
            let _ = decide(&bytes, &setup.policy());
        }
    }
}
