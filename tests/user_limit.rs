//! `--max-connections-per-user` (PROTOCOL §14.4): the upgrade that would give
//! one user more than N open connections on the node is refused with 429
//! after the token check, counted as `user_limit`; other users are not
//! affected, and a closed connection gives its slot back. Runs with every
//! loop count the suite runs with (connections land on different loops).
mod common;

use common::{TestServer, now_secs, status_of, token, token_with};
use roomcast::auth::TokenClaims;
use serde_json::Value;

fn stats(server: &TestServer) -> Value {
    let answer = server.raw(b"GET /api/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|_| panic!("stats JSON: {answer}"))
}

fn upgrade(sub: &str) -> Vec<u8> {
    upgrade_with(&token(sub))
}

fn upgrade_with(token: &str) -> Vec<u8> {
    format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

#[test]
fn a_users_extra_connection_gets_429_and_a_closed_one_frees_its_slot() {
    let server = TestServer::start(&["--max-connections-per-user", "2"]);
    let mut first = server.connect("ann");
    let _second = server.connect("ann");
    // The third of the same user is refused, after the token was checked.
    let refused = server.raw(&upgrade("ann"));
    assert_eq!(status_of(&refused), 429, "{refused}");
    assert_eq!(stats(&server)["handshakes_rejected_total"]["user_limit"], 1);
    // Ann's expired token is still a 401, not a 429: the limit comes after
    // the token check (the token is signed and names Ann, so only the order
    // of the checks tells the two answers apart).
    let expired = token_with(TokenClaims {
        sub: "ann".into(),
        expires_at: Some(now_secs() - 60),
        ..TokenClaims::default()
    });
    let refused = server.raw(&upgrade_with(&expired));
    assert_eq!(status_of(&refused), 401, "{refused}");
    // Another user is not affected.
    server.connect("ben").assert_alive();
    // One of Ann's closes; once the server's close reply is back, the slot
    // is free (given back as the close completes) and a new one gets in.
    first.ws.close(None).expect("close");
    loop {
        match first.ws.read() {
            Ok(tungstenite::Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        }
    }
    let mut again = server
        .try_open(&format!("/ws?token={}", token("ann")))
        .expect("the slot came back with the close");
    assert_eq!(again.recv()["type"], "welcome");
    assert_eq!(stats(&server)["handshakes_rejected_total"]["user_limit"], 1);
}

#[test]
fn without_the_flag_a_user_may_open_many() {
    let server = TestServer::start(&[]);
    let clients: Vec<_> = (0..6).map(|_| server.connect("cat")).collect();
    for mut client in clients {
        client.assert_alive();
    }
    assert_eq!(stats(&server)["handshakes_rejected_total"]["user_limit"], 0);
}
