//! The `roomcast` binary: parse flags, then mint a token or run the server.

use std::process::ExitCode;

use clap::Parser;
use roomcast::auth::{self, TokenClaims};
use roomcast::config::{Cli, Command, TokenArgs};
use roomcast::server::{self, Server};

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let server = match Server::bind(args) {
        Ok(server) => server,
        Err(error) => {
            server::report(&error);
            return ExitCode::FAILURE;
        }
    };
    let address = server.local_addr();
    // The banner goes to standard output (§11); tests read the first line for the port.
    println!("roomcast listening on http://{address}");
    if let Some(token) = server.demo_token("demo") {
        println!("demo mode: no --jwt-secret given, a random secret is in use");
        println!("connect: ws://{address}/ws?token={token}");
        println!("more guest tokens: http://{address}/demo/token?name=YOUR_NAME");
    }
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            server::report(&error);
            ExitCode::FAILURE
        }
    }
}
