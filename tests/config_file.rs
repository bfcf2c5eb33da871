//! `--config PATH` (PROTOCOL §14.1): flag > environment > file > default,
//! strict keys and types, and the shipped example file loads.
mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use common::{SECRET, TestServer, status_of};

fn scratch(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("roomcast-config-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("roomcast.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the binary to its exit; it must not start serving.
fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_roomcast"));
    for (name, _) in std::env::vars() {
        if name.starts_with("ROOMCAST_") {
            command.env_remove(name);
        }
    }
    let mut child = command
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start roomcast");
    let mut first = String::new();
    let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut first);
    if first.contains("listening on") {
        let _ = child.kill();
        let _ = child.wait();
        panic!("roomcast {args:?} started serving: {first}");
    }
    let mut errors = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut errors);
    (child.wait().unwrap().code(), errors)
}

/// A config file `text` stops the start with exit 2, naming `named`.
fn refused_naming(name: &str, text: &str, named: &str) {
    let file = scratch(name, text);
    let (code, errors) = run_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--config",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{name}: {errors}");
    assert!(errors.contains(named), "{name}: names `{named}`: {errors}");
}

fn upgrade(server: &TestServer, sub: &str) -> u16 {
    let request = format!(
        "GET /ws?token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        common::token(sub)
    );
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(common::WAIT)).unwrap();
    std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
    let mut answer = [0u8; 512];
    let read = stream.read(&mut answer).unwrap_or(0);
    status_of(&String::from_utf8_lossy(&answer[..read]))
}

#[test]
fn the_file_sets_flags_and_flags_win_over_it() {
    let file = scratch("sets", "max_connections = 1\nhistory = 7\n");
    let path = file.to_str().unwrap();
    let server = TestServer::start(&["--config", path]);
    let _first = server.connect("a");
    assert_eq!(upgrade(&server, "b"), 503, "the file's max_connections = 1");
    drop(server);
    // The flag wins over the file.
    let server = TestServer::start(&["--config", path, "--max-connections", "2"]);
    let _first = server.connect("a");
    let _second = server.connect("b");
    assert_eq!(upgrade(&server, "c"), 503, "the flag's 2");
}

#[test]
fn an_environment_variable_wins_over_the_file() {
    let file = scratch("env", "max_connections = 1\n");
    let mut child = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            SECRET,
            "--log-level",
            "warn",
        ])
        .args(["--config", file.to_str().unwrap()])
        .args(common::threads_args())
        .env("ROOMCAST_MAX_CONNECTIONS", "2")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    out.read_line(&mut first).unwrap();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let addr: std::net::SocketAddr = common::banner_address(first.trim()).expect("banner");
    let stats = || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        std::io::Write::write_all(
            &mut stream,
            b"GET /api/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text
    };
    assert!(stats().contains("200"));
    let token = common::token("x");
    let mut clients = Vec::new();
    for _ in 0..2 {
        let stream = std::net::TcpStream::connect(addr).unwrap();
        let url = format!("ws://{addr}/ws?token={token}");
        let (ws, _) = tungstenite::client(url.as_str(), stream).expect("upgrade under the env's 2");
        clients.push(ws);
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn unknown_keys_wrong_types_and_unreadable_files_exit_2_naming_them() {
    let cases = [
        ("unknown", "max_conections = 5\n", "max_conections"),
        ("type", "max_connections = \"many\"\n", "max-connections"),
        ("array", "history = [1, 2]\n", "history"),
        ("bool", "echo = \"yes\"\n", "echo"),
        ("origins", "allowed_origin = [1]\n", "allowed_origin"),
        ("toml", "history = \n", "not valid TOML"),
        (
            "namespace key",
            "[[namespace]]\nprefix = \"news:\"\nmax_member = 3\n",
            "max_member",
        ),
        (
            "namespace type",
            "[[namespace]]\nprefix = \"news:\"\nclient_publish = \"no\"\n",
            "namespace 1",
        ),
        ("namespace prefix", "[[namespace]]\nhistory = 3\n", "prefix"),
        (
            "namespace twice",
            "[[namespace]]\nprefix = \"a\"\n[[namespace]]\nprefix = \"a\"\n",
            "given twice",
        ),
    ];
    for (name, text, named) in cases {
        refused_naming(name, text, named);
    }
    let (code, errors) = run_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--config",
            "/nonexistent/roomcast.toml",
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{errors}");
    assert!(errors.contains("/nonexistent/roomcast.toml"), "{errors}");
}

#[test]
fn the_shipped_example_file_loads() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/roomcast.example.toml");
    let server = TestServer::start(&["--config", example]);
    server.connect("reader").assert_alive();
}

#[test]
fn relative_paths_in_the_file_are_taken_from_the_working_directory() {
    // The pair sits in the working directory, not beside the file: a path
    // taken from the file's folder would not be found and would exit 2.
    let file = scratch(
        "relative",
        "tls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n",
    );
    let working = file.with_file_name("working");
    std::fs::create_dir_all(&working).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(working.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(working.join("key.pem"), key.serialize_pem()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            SECRET,
            "--log-level",
            "warn",
        ])
        .args(["--config", file.to_str().unwrap()])
        .current_dir(&working)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut first);
    let _ = child.kill();
    let _ = child.wait();
    let mut errors = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut errors);
    assert!(
        first.contains("listening on https://"),
        "expected a TLS banner from the working directory's pair, got {first:?}; stderr: {errors}"
    );
}

#[test]
fn webhook_flags_exit_2_on_a_bad_url_or_no_signing_key() {
    let listen = ["--listen", "127.0.0.1:0"];
    let (code, errors) = run_to_exit(
        &[&listen[..], &["--webhook-url", "ftp://backend/hook"]].concat(),
        &[],
    );
    assert_eq!(code, Some(2), "{errors}");
    assert!(errors.contains("--webhook-url"), "{errors}");
    let (code, errors) = run_to_exit(&listen, &[("ROOMCAST_WEBHOOK_URL", "backend/hook")]);
    assert_eq!(code, Some(2), "{errors}");
    assert!(errors.contains("ROOMCAST_WEBHOOK_URL"), "{errors}");
    // Neither --webhook-secret nor --api-key: nothing to sign with.
    let (code, errors) = run_to_exit(
        &[&listen[..], &["--webhook-url", "http://127.0.0.1:9/hook"]].concat(),
        &[],
    );
    assert_eq!(code, Some(2), "{errors}");
    assert!(errors.contains("--webhook-secret"), "{errors}");
    let (code, errors) = run_to_exit(
        &[
            &listen[..],
            &[
                "--webhook-url",
                "http://127.0.0.1:9/hook",
                "--webhook-secret",
                "",
            ],
        ]
        .concat(),
        &[],
    );
    assert_eq!(code, Some(2), "{errors}");
}

#[test]
fn webhook_keys_in_the_file_configure_the_webhook() {
    let receiver = common::webhook_receiver::WebhookReceiver::start();
    let file = scratch(
        "webhook",
        &format!(
            "webhook_url = \"{}\"\nwebhook_secret = \"from-the-file\"\nwebhook_queue = 5\n",
            receiver.url()
        ),
    );
    // Started with no --api-key: the file's secret is what lets it start.
    let server = TestServer::start(&["--config", file.to_str().unwrap()]);
    let metrics = server.raw(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(status_of(&metrics), 200);
    for family in [
        "roomcast_webhook_events_total{result=\"delivered\"} 0",
        "roomcast_webhook_events_total{result=\"dropped\"} 0",
        "roomcast_webhook_queue_events 0",
        "roomcast_webhook_failures_total 0",
    ] {
        assert!(metrics.contains(family), "{family} missing:\n{metrics}");
    }
    // SIGTERM: the drain, then the webhook's finish, then a clean exit.
    assert!(server.terminate().success());
    // Without the webhook, no webhook families.
    let server = TestServer::start(&[]);
    let metrics = server.raw(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(!metrics.contains("roomcast_webhook"), "{metrics}");
    // A bad value in the file exits 2 naming its key; a URL with no key too.
    for (name, text, named) in [
        (
            "webhook-queue",
            "webhook_url = \"http://127.0.0.1:9/\"\nwebhook_secret = \"s\"\nwebhook_queue = 0\n",
            "webhook_queue",
        ),
        (
            "webhook-url",
            "webhook_url = \"nope\"\nwebhook_secret = \"s\"\n",
            "webhook_url",
        ),
        (
            "webhook-key",
            "webhook_url = \"http://127.0.0.1:9/\"\n",
            "--webhook-secret",
        ),
    ] {
        refused_naming(name, text, named);
    }
}
