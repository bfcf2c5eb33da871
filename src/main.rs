//! The `roomcast` binary: parse flags, then mint a token or run the server.

use std::io::Write as _;
use std::process::ExitCode;

use roomcast::auth::{self, TokenClaims};
use roomcast::config::{Command, SHORT_SECRET_BYTES, TokenArgs};
use roomcast::net::{self as server, Server};

fn main() -> ExitCode {
    let cli = roomcast::config::parse_command_line();
    match cli.command {
        Some(Command::Token(args)) => {
            println!("{}", mint(&args));
            ExitCode::SUCCESS
        }
        None => serve(cli.server),
    }
}

fn mint(args: &TokenArgs) -> String {
    let expires_at = args.ttl.map(|ttl| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        now + ttl
    });
    auth::sign(
        args.secret.as_bytes(),
        &TokenClaims {
            sub: args.sub.clone(),
            name: args.name.clone(),
            expires_at,
            rooms: args.rooms.clone(),
        },
    )
}

fn serve(args: roomcast::config::ServerArgs) -> ExitCode {
    if let Err(error) = args.validate() {
        eprintln!("error: {error}");
        return ExitCode::from(2);
    }
    let _ = simple_logger::SimpleLogger::new()
        .with_level(args.log_level)
        .init();
    if let Some(secret) = &args.jwt_secret
        && secret.len() < SHORT_SECRET_BYTES
    {
        log::warn!(
            "--jwt-secret is {} bytes; use at least {SHORT_SECRET_BYTES} random bytes \
             (`openssl rand -hex 32`): a short HS256 secret can be brute-forced offline from one token",
            secret.len()
        );
    }
    let server = match Server::bind(args) {
        Ok(server) => server,
        Err(error @ server::ServerError::Tls(_)) => {
            // A certificate or key that cannot be used is a configuration error.
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
        Err(error) => {
            server::report(&error);
            return ExitCode::FAILURE;
        }
    };
    let address = server.local_addr();
    // The banner goes to standard output (§11); tests read the first line for
    // the port. A closed or full standard output must not stop the server, so
    // write errors are ignored (`println!` would panic on a broken pipe).
    let (http, ws) = if server.uses_tls() {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    let mut banner = format!(
        "roomcast listening on {http}://{address}\nopen {http}://{}/ in a browser for the demo chat\n",
        browsable(address)
    );
    if let Some(token) = server.demo_token("demo") {
        banner.push_str("demo mode: no --jwt-secret given, a random secret is in use\n");
        banner.push_str(&format!("connect: {ws}://{address}/ws?token={token}\n"));
        banner.push_str(&format!(
            "more guest tokens: {http}://{address}/demo/token?name=YOUR_NAME\n"
        ));
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(banner.as_bytes()).and_then(|()| out.flush());
    drop(out);
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            server::report(&error);
            ExitCode::FAILURE
        }
    }
}

/// The address a browser on this machine can open: a wildcard listen address
/// (`0.0.0.0`, `[::]`) is not one, so it becomes loopback.
fn browsable(address: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let ip = match address.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    std::net::SocketAddr::new(ip, address.port())
}
