//! Browser tests of the demo page (`web/index.html`) and its client module
//! (`web/roomcast.js`), driven from `cargo test`:
//!
//! - `client_module_logic`: `node --test tests/browser/client.test.mjs`, the
//!   client's reconnect, recovery and ordering rules against a scripted fake
//!   WebSocket (needs only Node.js);
//! - `client_auth_against_real_server`: `node --test tests/browser/auth.test.mjs`,
//!   the client under Node against this crate's `roomcast` binary: a refused
//!   token ends in `auth_error` and state "closed", or with `getToken` in a
//!   fresh token and a session (needs only Node.js: 22+, or 20.10+ where the
//!   global WebSocket is behind `--experimental-websocket`, passed when needed);
//! - `client_over_wss_against_real_server`: `node --test tests/browser/wss.test.mjs`,
//!   the same client against the binary serving TLS, with a certificate made
//!   here and trusted through `NODE_EXTRA_CA_CERTS` (verification stays on);
//! - `chat_page_in_headless_chromium`: `node tests/browser/chat.test.mjs`, the
//!   page in Debian's Chromium through playwright-core against this crate's
//!   `roomcast` binary, including a server restart (needs Node.js, npm and
//!   `/usr/bin/chromium`).
//!
//! `tests/browser/node_modules` is installed with `npm ci` when missing. A
//! missing tool fails the test with the command that installs it, unless
//! `ROOMCAST_SKIP_BROWSER=1`, which skips these tests with a notice.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::show_output;

const CHROMIUM: &str = "/usr/bin/chromium";
const INSTALL_HINT: &str = "install them with `apt-get update && apt-get install -y chromium chromium-driver nodejs npm` \
     (or set ROOMCAST_SKIP_BROWSER=1 to skip the browser tests)";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn browser_dir() -> PathBuf {
    root().join("tests").join("browser")
}

fn skipped(test: &str) -> bool {
    let skip = std::env::var("ROOMCAST_SKIP_BROWSER").is_ok_and(|v| v == "1");
    if skip {
        eprintln!("SKIPPED {test}: ROOMCAST_SKIP_BROWSER=1");
    }
    skip
}

fn tool_works(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Panics naming whatever is missing and how to install it.
fn require(node: bool, npm: bool, chromium: bool) {
    let mut missing = Vec::new();
    if node && !tool_works("node") {
        missing.push("node (Node.js)");
    }
    if npm && !tool_works("npm") {
        missing.push("npm");
    }
    if chromium && !Path::new(CHROMIUM).exists() {
        missing.push("Chromium at /usr/bin/chromium");
    }
    assert!(
        missing.is_empty(),
        "the browser tests need {}: {INSTALL_HINT}",
        missing.join(", ")
    );
}

/// `npm ci` in tests/browser when playwright-core is not installed yet.
fn install_node_modules() {
    let dir = browser_dir();
    if dir.join("node_modules").join("playwright-core").exists() {
        return;
    }
    require(true, true, false);
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .output()
        .expect("run npm ci");
    assert!(
        out.status.success(),
        "`npm ci` in {} failed:\n{}",
        dir.display(),
        show_output(&out)
    );
}

#[test]
fn client_module_logic() {
    if skipped("client_module_logic") {
        return;
    }
    require(true, false, false);
    let out = Command::new("node")
        .args(["--test", "tests/browser/client.test.mjs"])
        .current_dir(root())
        .output()
        .expect("run node --test");
    assert!(
        out.status.success(),
        "web/roomcast.js unit tests failed:\n{}",
        show_output(&out)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
}

/// The `node` flags that give it a global WebSocket: none on Node 22+;
/// `--experimental-websocket` on Node 20.10 to 21, which have it only behind it.
fn node_websocket_flags() -> &'static [&'static str] {
    let has_websocket = |flags: &[&str]| {
        Command::new("node")
            .args(flags)
            .args([
                "-e",
                "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
            ])
            .output()
            .is_ok_and(|out| out.status.success())
    };
    const FLAG: &[&str] = &["--experimental-websocket"];
    if has_websocket(&[]) {
        &[]
    } else if has_websocket(FLAG) {
        FLAG
    } else {
        panic!(
            "this Node.js has no WebSocket, not even with --experimental-websocket: \
             the client test needs Node.js 22+ (or 20.10+); {INSTALL_HINT}"
        )
    }
}

#[test]
fn client_auth_against_real_server() {
    if skipped("client_auth_against_real_server") {
        return;
    }
    require(true, false, false);
    let out = Command::new("node")
        .args(node_websocket_flags())
        .args(["--test", "tests/browser/auth.test.mjs"])
        .env("ROOMCAST_BIN", env!("CARGO_BIN_EXE_roomcast"))
        .current_dir(root())
        .output()
        .expect("run node --test tests/browser/auth.test.mjs");
    assert!(
        out.status.success(),
        "web/roomcast.js against the roomcast binary failed:\n{}",
        show_output(&out)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn client_over_wss_against_real_server() {
    if skipped("client_over_wss_against_real_server") {
        return;
    }
    require(true, false, false);
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("certificate params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "roomcast wss test");
    let key = rcgen::KeyPair::generate().expect("key pair");
    let cert = params.self_signed(&key).expect("self-signed certificate");
    let dir = std::env::temp_dir().join(format!("roomcast-wss-node-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.pem()).expect("write certificate");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    let out = Command::new("node")
        .args(node_websocket_flags())
        .args(["--test", "tests/browser/wss.test.mjs"])
        .env("ROOMCAST_BIN", env!("CARGO_BIN_EXE_roomcast"))
        .env("ROOMCAST_TEST_CERT", &cert_path)
        .env("ROOMCAST_TEST_KEY", &key_path)
        .env("NODE_EXTRA_CA_CERTS", &cert_path)
        .current_dir(root())
        .output()
        .expect("run node --test tests/browser/wss.test.mjs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "web/roomcast.js over wss:// against the roomcast binary failed:\n{}",
        show_output(&out)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn chat_page_in_headless_chromium() {
    if skipped("chat_page_in_headless_chromium") {
        return;
    }
    require(true, true, true);
    install_node_modules();
    let out = Command::new("node")
        .arg("tests/browser/chat.test.mjs")
        .env("ROOMCAST_BIN", env!("CARGO_BIN_EXE_roomcast"))
        .current_dir(root())
        .output()
        .expect("run node tests/browser/chat.test.mjs");
    assert!(
        out.status.success(),
        "the browser test failed (screenshots in target/browser/):\n{}",
        show_output(&out)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
}
