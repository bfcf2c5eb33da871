//! Command line and environment: every flag of PROTOCOL §9, each also read from
//! its `ROOMCAST_*` variable. clap does the parsing so that an unknown flag or a
//! bad value gets a clear message and exit code 2 without code of ours.

use std::net::{SocketAddr, ToSocketAddrs};

use clap::{Args, Parser, Subcommand};

/// The `roomcast` command line.
#[derive(Debug, Parser)]
#[command(
    name = "roomcast",
    version,
    about = "A single-binary WebSocket rooms server on a hand-rolled mio event loop",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// `roomcast token …`; without a subcommand the server runs.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Server flags (used when no subcommand is given).
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Subcommands besides running the server.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a signed HS256 token (for scripts, tests and the bench harness).
    Token(TokenArgs),
}

/// Flags of `roomcast token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The server's JWT secret.
    #[arg(long, env = "ROOMCAST_JWT_SECRET", hide_env_values = true, value_parser = non_empty_secret)]
    pub secret: String,
    /// The user id (`sub` claim).
    #[arg(long, value_parser = non_empty)]
    pub sub: String,
    /// The display name (`name` claim); defaults to the user id.
    #[arg(long)]
    pub name: Option<String>,
    /// Lifetime in seconds (at least 1); without it the token never expires.
    #[arg(long, allow_negative_numbers = true, value_parser = time_to_live)]
    pub ttl: Option<u64>,
    /// Room patterns the token may join (`rooms` claim), comma-separated, e.g. `lobby,team:*`.
    #[arg(long, value_delimiter = ',')]
    pub rooms: Option<Vec<String>>,
}

/// Flags of the server (PROTOCOL §9).
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// A TOML file setting any of these flags (a flag or its variable wins over it).
    #[arg(long, env = "ROOMCAST_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Address to listen on: IP:PORT or HOST:PORT (a host name is resolved).
    #[arg(long, env = "ROOMCAST_LISTEN", default_value = "127.0.0.1:8080", value_parser = listen_address)]
    pub listen: SocketAddr,
    /// Event loops (threads serving connections); default: the cores this process may use.
    #[arg(long, env = "ROOMCAST_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
    /// TLS certificate chain (PEM); with --tls-key the port speaks TLS only.
    #[arg(long, env = "ROOMCAST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// TLS private key (PEM: PKCS#8, PKCS#1 or SEC1), for --tls-cert.
    #[arg(long, env = "ROOMCAST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// HS256 secret for client tokens. Without it the server runs in demo mode with a random secret.
    #[arg(long, env = "ROOMCAST_JWT_SECRET", hide_env_values = true, value_parser = non_empty_secret)]
    pub jwt_secret: Option<String>,
    /// Bearer key for the server API (publish endpoint disabled without it).
    #[arg(long, env = "ROOMCAST_API_KEY", hide_env_values = true, value_parser = non_empty_secret)]
    pub api_key: Option<String>,
    /// Allowed `Origin` for browser upgrades (repeatable; default: any origin).
    #[arg(long, env = "ROOMCAST_ALLOWED_ORIGIN", value_delimiter = ',', value_parser = non_empty)]
    pub allowed_origin: Vec<String>,
    /// Most upgraded WebSocket connections at once; more get 503.
    #[arg(long, env = "ROOMCAST_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// Most open connections of one user (`sub`) on this node; more get 429 (0: no limit).
    #[arg(long, env = "ROOMCAST_MAX_CONNECTIONS_PER_USER", default_value_t = 0)]
    pub max_connections_per_user: usize,
    /// Largest message (and frame) a client may send, in bytes; larger closes with 1009.
    #[arg(long, env = "ROOMCAST_MAX_MESSAGE_SIZE", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_message_size: u64,
    /// Most rooms one connection may be in.
    #[arg(long, env = "ROOMCAST_MAX_ROOMS_PER_CONNECTION", default_value_t = 100)]
    pub max_rooms_per_connection: usize,
    /// Interval of server pings, in milliseconds.
    #[arg(long, env = "ROOMCAST_HEARTBEAT_MS", default_value_t = 30_000)]
    pub heartbeat_ms: u64,
    /// How long after a ping a silent connection is closed, in milliseconds.
    #[arg(long, env = "ROOMCAST_PONG_TIMEOUT_MS", default_value_t = 10_000)]
    pub pong_timeout_ms: u64,
    /// Time a client has to send its complete request head, in milliseconds.
    #[arg(long, env = "ROOMCAST_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// Messages per second per connection (token bucket rate; 0 disables the limit).
    #[arg(long, env = "ROOMCAST_RATE_LIMIT", default_value_t = 50)]
    pub rate_limit: u32,
    /// Token bucket size: messages a connection may send in a burst.
    #[arg(long, env = "ROOMCAST_RATE_BURST", default_value_t = 100)]
    pub rate_burst: u32,
    /// Outbound bytes queued for one connection above which room broadcasts to it are dropped.
    #[arg(long, env = "ROOMCAST_WRITE_BUFFER_SOFT", default_value_t = 262_144)]
    pub write_buffer_soft: usize,
    /// Outbound bytes queued for one connection above which it is closed (4000).
    #[arg(long, env = "ROOMCAST_WRITE_BUFFER_HARD", default_value_t = 4_194_304)]
    pub write_buffer_hard: usize,
    /// Messages kept per room for recovery with `since`.
    #[arg(long, env = "ROOMCAST_HISTORY", default_value_t = 100)]
    pub history: usize,
    /// The config file's `[[namespace]]` tables (no flag sets them).
    #[arg(skip)]
    pub namespaces: Vec<crate::hub::NamespaceSpec>,
    /// Typing state expires after this many milliseconds without a `typing` (0: never).
    #[arg(long, env = "ROOMCAST_TYPING_TIMEOUT_MS", default_value_t = 6_000)]
    pub typing_timeout_ms: u64,
    /// Window over which clients are closed on shutdown, in milliseconds.
    #[arg(long, env = "ROOMCAST_DRAIN_MS", default_value_t = 3_000)]
    pub drain_ms: u64,
    /// File where rooms' epoch, seq and history survive a restart.
    #[arg(long, env = "ROOMCAST_STATE_FILE")]
    pub state_file: Option<std::path::PathBuf>,
    /// Redis URL: rooms span every node on that Redis.
    #[arg(long, env = "ROOMCAST_REDIS")]
    pub redis: Option<String>,
    /// URL the application's backend takes webhook events at (http:// or https://).
    #[arg(long, env = "ROOMCAST_WEBHOOK_URL", value_parser = webhook_url)]
    pub webhook_url: Option<String>,
    /// HMAC-SHA256 key of the webhooks' `X-Roomcast-Signature`; default: the --api-key.
    #[arg(long, env = "ROOMCAST_WEBHOOK_SECRET", hide_env_values = true, value_parser = non_empty_secret)]
    pub webhook_secret: Option<String>,
    /// Most webhook events waiting to be sent; beyond it the oldest are dropped.
    #[arg(long, env = "ROOMCAST_WEBHOOK_QUEUE", default_value_t = 100_000, value_parser = at_least_one)]
    pub webhook_queue: usize,
    /// Enable the `/echo` WebSocket endpoint (conformance suite, echo benchmark).
    #[arg(long, env = "ROOMCAST_ECHO")]
    pub echo: bool,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "ROOMCAST_LOG_LEVEL", default_value = "info")]
    pub log_level: log::LevelFilter,
}

/// A secret shorter than this draws a warning at start: HS256 with a short
/// secret can be brute-forced offline from a single token.
pub const SHORT_SECRET_BYTES: usize = 32;

/// Refuses an empty value: an unset shell variable expanded to nothing must
/// not switch a check off without a word (PROTOCOL §9).
fn non_empty(value: &str) -> Result<String, String> {
    if value.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(value.to_owned())
    }
}

/// As [`non_empty`], saying how to make a good secret.
fn non_empty_secret(value: &str) -> Result<String, String> {
    non_empty(value).map_err(|_| {
        "must not be empty (an unset variable expanded to nothing?); \
         make one with `openssl rand -hex 32`"
            .into()
    })
}

/// A count of at least one (a queue of no events could hold nothing).
fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(count) if count >= 1 => Ok(count),
        _ => Err("expected a whole number of at least 1".into()),
    }
}

/// An absolute `http://` or `https://` URL with a host: where webhook
/// batches go (§14.2). Checked at start so a typo stops the start rather
/// than failing every delivery later.
fn webhook_url(value: &str) -> Result<String, String> {
    const FORM: &str = "expected an http:// or https:// URL, e.g. https://backend.example/roomcast";
    let uri: ureq::http::Uri = value.parse().map_err(|error| format!("{error}; {FORM}"))?;
    let scheme = uri.scheme_str().map(str::to_ascii_lowercase);
    if !matches!(scheme.as_deref(), Some("http" | "https")) {
        return Err(FORM.into());
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("no host; {FORM}"));
    }
    Ok(value.to_owned())
}

/// A token lifetime of at least one second: a TTL of 0 or less would mint a
/// token that is already expired.
fn time_to_live(value: &str) -> Result<u64, String> {
    match value.parse::<i64>() {
        Ok(seconds) if seconds >= 1 => Ok(seconds.unsigned_abs()),
        Ok(_) => {
            Err("must be at least 1 second (omit --ttl for a token that never expires)".into())
        }
        Err(_) => Err("expected a whole number of seconds, e.g. 3600".into()),
    }
}

/// `IP:PORT` or `HOST:PORT`, resolved once at start. An IPv4 address is
/// preferred when a name has several, so `localhost:8080` means what the
/// banner's `127.0.0.1` URLs say.
fn listen_address(value: &str) -> Result<SocketAddr, String> {
    const FORMS: &str =
        "expected HOST:PORT, e.g. 127.0.0.1:8080, 0.0.0.0:8080, [::1]:8080 or localhost:8080";
    if let Ok(address) = value.parse::<SocketAddr>() {
        return Ok(address);
    }
    let addresses: Vec<SocketAddr> = match value.to_socket_addrs() {
        Ok(addresses) => addresses.collect(),
        Err(error) => return Err(format!("{error}; {FORMS}")),
    };
    addresses
        .iter()
        .find(|address| address.is_ipv4())
        .or_else(|| addresses.first())
        .copied()
        .ok_or_else(|| format!("{value} resolves to no address; {FORMS}"))
}

/// Parses the command line and the environment. A bad value that came from a
/// `ROOMCAST_*` variable is reported with the variable's name, since clap
/// names only the flag, which the user may never have typed.
pub fn parse_command_line() -> Cli {
    use clap::CommandFactory;
    let mut arguments: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = parse_or_exit(&arguments, None);
    let Some(path) = cli
        .command
        .is_none()
        .then(|| cli.server.config.clone())
        .flatten()
    else {
        return cli;
    };
    // The file's keys become the flags they stand for, for every flag given
    // neither on the command line nor in the environment.
    let Ok(matches) = Cli::command().try_get_matches_from(&arguments) else {
        return cli;
    };
    match crate::config_file::file_settings(&path, &matches) {
        Ok(settings) => {
            let mut cli = if settings.words.is_empty() {
                cli
            } else {
                arguments.extend(settings.words);
                parse_or_exit(&arguments, Some(&path))
            };
            cli.server.namespaces = settings.namespaces;
            cli
        }
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(2);
        }
    }
}

/// Parses, or exits with clap's message, naming the environment variable or
/// the config file's key a bad value came from.
fn parse_or_exit(arguments: &[std::ffi::OsString], file: Option<&std::path::Path>) -> Cli {
    match Cli::try_parse_from(arguments) {
        Ok(cli) => cli,
        Err(error) => {
            if let Some(file) = file
                && let Some(flag) = invalid_flag(&error)
            {
                let key = flag
                    .split_whitespace()
                    .next()
                    .and_then(|long| long.strip_prefix("--"))
                    .map(|long| long.replace('-', "_"))
                    .unwrap_or_default();
                let typed = std::env::args_os().any(|argument| {
                    argument.to_str().is_some_and(|argument| {
                        argument.starts_with(&format!("--{}", key.replace('_', "-")))
                    })
                });
                if !typed && !key.is_empty() {
                    let quoted = format!("'{flag}'");
                    let text = error.render().to_string().replacen(
                        &quoted,
                        &format!(
                            "{quoted} (from the key `{key}` in --config {})",
                            file.display()
                        ),
                        1,
                    );
                    eprint!("{text}");
                    std::process::exit(2);
                }
            }
            if let Some((flag, variable)) = variable_behind(&error, arguments) {
                let quoted = format!("'{flag}'");
                let text = error.render().to_string().replacen(
                    &quoted,
                    &format!("{quoted} (from the environment variable {variable})"),
                    1,
                );
                eprint!("{text}");
                std::process::exit(error.exit_code());
            }
            error.exit()
        }
    }
}

/// The flag a value error is about, as clap names it (`--history <HISTORY>`).
fn invalid_flag(error: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    match error.get(ContextKind::InvalidArg)? {
        ContextValue::String(flag) => Some(flag.clone()),
        _ => None,
    }
}

/// The environment variable that supplied the value `error` refuses, when
/// the flag itself is not on the command line.
fn variable_behind(
    error: &clap::Error,
    arguments: &[std::ffi::OsString],
) -> Option<(String, String)> {
    use clap::CommandFactory;
    use clap::error::{ContextKind, ContextValue};
    let ContextValue::String(flag) = error.get(ContextKind::InvalidArg)? else {
        return None;
    };
    // clap names the argument as `--history <HISTORY>`.
    let long = flag.split_whitespace().next()?.strip_prefix("--")?;
    let typed = arguments.iter().any(|argument| {
        argument.to_str().is_some_and(|argument| {
            argument
                .strip_prefix("--")
                .is_some_and(|rest| rest == long || rest.starts_with(&format!("{long}=")))
        })
    });
    if typed {
        return None;
    }
    let command = Cli::command();
    let argument = command
        .get_arguments()
        .chain(
            command
                .get_subcommands()
                .flat_map(|subcommand| subcommand.get_arguments()),
        )
        .find(|argument| argument.get_long() == Some(long))?;
    let variable = argument.get_env()?;
    std::env::var_os(variable).map(|_| (flag.clone(), variable.to_string_lossy().into_owned()))
}

/// A flag combination the server refuses to start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// §11: the hard mark must leave room for one full message above the soft mark.
    #[error(
        "--write-buffer-hard ({hard}) must be at least --write-buffer-soft + --max-message-size ({needed})"
    )]
    HardMarkTooLow {
        /// The configured hard mark.
        hard: usize,
        /// soft + max message size.
        needed: usize,
    },
    /// `--redis` is not a Redis URL.
    #[error("--redis: {0}")]
    RedisUrl(String),
    /// §14.2: webhooks are signed, with `--webhook-secret` or the `--api-key`.
    #[error(
        "--webhook-url needs a key to sign the webhooks with: set --webhook-secret \
         (ROOMCAST_WEBHOOK_SECRET) or --api-key (ROOMCAST_API_KEY)"
    )]
    WebhookSecretMissing,
}

impl ServerArgs {
    /// Every room's options: the config file's namespaces over the flags.
    pub fn namespaces(&self) -> crate::hub::Namespaces {
        crate::hub::Namespaces::new(
            crate::hub::RoomOptions::defaults(self.history),
            &self.namespaces,
        )
    }

    /// Checks the rules that span several flags.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let needed = self
            .write_buffer_soft
            .saturating_add(usize::try_from(self.max_message_size).unwrap_or(usize::MAX));
        if self.write_buffer_hard < needed {
            return Err(ConfigError::HardMarkTooLow {
                hard: self.write_buffer_hard,
                needed,
            });
        }
        if let Some(url) = &self.redis
            && let Err(error) = redis::Client::open(url.as_str())
        {
            return Err(ConfigError::RedisUrl(error.to_string()));
        }
        if self.webhook_url.is_some() && self.webhook_signing_key().is_none() {
            return Err(ConfigError::WebhookSecretMissing);
        }
        Ok(())
    }

    /// The key that signs webhooks: `--webhook-secret`, else the `--api-key`.
    pub fn webhook_signing_key(&self) -> Option<&str> {
        self.webhook_secret.as_deref().or(self.api_key.as_deref())
    }

    /// The event loops to run: `--threads`, else the cores the process may use.
    pub fn loops(&self) -> usize {
        match self.threads {
            Some(threads) => usize::from(threads),
            None => std::thread::available_parallelism().map_or(1, usize::from),
        }
    }

    /// The largest message size as `usize` (saturating on small targets).
    pub fn max_message_bytes(&self) -> usize {
        usize::try_from(self.max_message_size).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_follow_the_contract() {
        let cli = Cli::try_parse_from(["roomcast"]).unwrap();
        let args = cli.server;
        assert_eq!(args.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(args.max_connections, 100_000);
        assert_eq!(args.max_message_size, 65_536);
        assert_eq!(args.write_buffer_soft, 262_144);
        assert_eq!(args.write_buffer_hard, 4_194_304);
        assert_eq!(args.history, 100);
        assert!(args.validate().is_ok());
    }

    #[test]
    fn hard_mark_below_soft_plus_message_is_refused() {
        let cli = Cli::try_parse_from([
            "roomcast",
            "--write-buffer-soft",
            "1000",
            "--write-buffer-hard",
            "1500",
            "--max-message-size",
            "1000",
        ])
        .unwrap();
        assert!(cli.server.validate().is_err());
    }

    #[test]
    fn a_bad_redis_url_is_refused() {
        let cli = Cli::try_parse_from(["roomcast", "--redis", "http://nope"]).unwrap();
        assert!(cli.server.validate().is_err());
        let cli = Cli::try_parse_from(["roomcast", "--redis", "redis://127.0.0.1:6379"]).unwrap();
        assert!(cli.server.validate().is_ok());
    }

    #[test]
    fn webhook_flags_are_checked() {
        for args in [
            vec!["roomcast", "--webhook-url", "ftp://backend/hook"],
            vec!["roomcast", "--webhook-url", "backend.example/hook"],
            vec!["roomcast", "--webhook-url", "http://"],
            vec!["roomcast", "--webhook-url", ""],
            vec!["roomcast", "--webhook-secret", ""],
            vec!["roomcast", "--webhook-queue", "0"],
            vec!["roomcast", "--webhook-queue", "-1"],
        ] {
            let error = Cli::try_parse_from(&args).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{args:?}");
        }
        let cli = Cli::try_parse_from(["roomcast"]).unwrap();
        assert_eq!(cli.server.webhook_queue, 100_000);
        let url = [
            "roomcast",
            "--webhook-url",
            "HTTPS://backend.example:8443/hook",
        ];
        let cli = Cli::try_parse_from(url).unwrap();
        assert!(matches!(
            cli.server.validate(),
            Err(ConfigError::WebhookSecretMissing)
        ));
        let cli = Cli::try_parse_from([&url[..], &["--api-key", "k"]].concat()).unwrap();
        assert_eq!(cli.server.webhook_signing_key(), Some("k"));
        assert!(cli.server.validate().is_ok());
        let both = [&url[..], &["--api-key", "k", "--webhook-secret", "w"]].concat();
        let cli = Cli::try_parse_from(both).unwrap();
        assert_eq!(cli.server.webhook_signing_key(), Some("w"));
    }

    #[test]
    fn unknown_flag_and_bad_value_are_usage_errors() {
        let error = Cli::try_parse_from(["roomcast", "--nope"]).unwrap_err();
        assert_eq!(error.exit_code(), 2);
        let error = Cli::try_parse_from(["roomcast", "--history", "lots"]).unwrap_err();
        assert_eq!(error.exit_code(), 2);
    }

    #[test]
    fn listen_takes_addresses_and_host_names() {
        assert_eq!(
            listen_address("[::1]:9000").unwrap().to_string(),
            "[::1]:9000"
        );
        let resolved = listen_address("localhost:9000").unwrap();
        assert!(resolved.ip().is_loopback() && resolved.port() == 9000);
        for bad in ["", "9000", "localhost", "host:port"] {
            let error = listen_address(bad).unwrap_err();
            assert!(error.contains("localhost:8080"), "{bad}: {error}");
        }
    }

    #[test]
    fn empty_secrets_and_short_lifetimes_are_refused() {
        for args in [
            vec!["roomcast", "--jwt-secret", ""],
            vec!["roomcast", "--api-key", ""],
            vec!["roomcast", "--allowed-origin", ""],
            vec!["roomcast", "token", "--secret", "", "--sub", "a"],
            vec!["roomcast", "token", "--secret", "s", "--sub", ""],
            vec![
                "roomcast", "token", "--secret", "s", "--sub", "a", "--ttl", "0",
            ],
            vec![
                "roomcast", "token", "--secret", "s", "--sub", "a", "--ttl", "-1",
            ],
        ] {
            let error = Cli::try_parse_from(&args).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn token_subcommand_parses_rooms_list() {
        let cli = Cli::try_parse_from([
            "roomcast", "token", "--secret", "s", "--sub", "alice", "--rooms", "a,team:*",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Token(token)) => {
                assert_eq!(token.rooms.unwrap(), vec!["a", "team:*"]);
                assert_eq!(token.ttl, None);
            }
            None => panic!("expected the token subcommand"),
        }
    }
}
