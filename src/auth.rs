//! Bearer-token authentication: HS256 JWTs minted with the server secret.
//!
//! Tokens arrive from untrusted clients, so [`Verifier::verify`] treats every
//! byte as hostile: it bounds the input length, never panics, pins the
//! algorithm to HS256 *before* looking at the signature (so `alg: none` and
//! algorithm-confusion tricks cannot work), checks the MAC in constant time,
//! and only then reads the claims.
//!
//! Encoding decisions:
//! - Each part must be base64url **without padding**; `=` characters and
//!   non-canonical trailing bits are rejected, so one token has exactly one
//!   accepted spelling.
//! - A header carrying `crit` is rejected: we understand no JWS extensions,
//!   and RFC 7515 requires refusing tokens that demand ones we do not know.
//! - `exp`/`nbf` may be any JSON number; fractional values are rounded up to
//!   the next whole second, which is exactly equivalent to comparing against
//!   the fractional value with an integer clock.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Longest token we will even look at, so a hostile client cannot make us
/// decode and parse arbitrarily large blobs.
const MAX_TOKEN_LEN: usize = 8192;

/// Which rooms a token lets its holder name.
///
/// Kept separate from the raw claim so the "absent means everything" and
/// `"*"` rules are decided once, at verification time, rather than by every
/// caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomAccess {
    /// No restriction: the token had no `rooms` claim, or it contained `"*"`.
    Every,
    /// Only rooms matching one of these patterns: an exact name, or a prefix
    /// followed by a trailing `*` (e.g. `team:*`). Empty means no room at all.
    Patterns(Vec<String>),
}

impl RoomAccess {
    /// Whether the holder may join or address `room`; the single place where
    /// pattern semantics live so joins and sends cannot disagree.
    pub fn allows(&self, room: &str) -> bool {
        match self {
            RoomAccess::Every => true,
            RoomAccess::Patterns(patterns) => patterns.iter().any(|p| pattern_matches(p, room)),
        }
    }
}

/// A trailing `*` turns the rest of the pattern into a prefix; anything else
/// must match exactly (a `*` elsewhere is just a character).
fn pattern_matches(pattern: &str, room: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => room.starts_with(prefix),
        None => pattern == room,
    }
}

/// Who a verified token speaks for.
///
/// Only produced by [`Verifier::verify`], so holding one means the signature,
/// algorithm and time window have all been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Stable user id from `sub`; what permissions and presence key on.
    pub user_id: String,
    /// Display name shown to other room members; falls back to `user_id`
    /// so there is always something to show.
    pub name: String,
    /// `exp` in seconds since the epoch (rounded up if fractional), so a
    /// long-lived connection can be dropped when its token lapses.
    /// The token is valid while `now < expires_at`.
    pub expires_at: Option<u64>,
    /// Rooms this identity may name.
    pub rooms: RoomAccess,
}

/// Why a token was refused.
///
/// Variants are coarse on purpose: enough for logs and a client-facing
/// message, without echoing attacker-controlled content back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Refused before parsing to bound the work a client can cause.
    #[error("token is too long (limit is 8192 bytes)")]
    TooLong,
    /// Not a well-formed compact JWS: wrong number of parts, bad base64url,
    /// header or claims not a JSON object, or an unsupported `crit` header.
    #[error("token is malformed")]
    Malformed,
    /// Header `alg` is missing or anything but `HS256` (including `none`).
    #[error("token uses an unsupported signing algorithm (only HS256 is accepted)")]
    UnsupportedAlgorithm,
    /// The MAC does not match: wrong secret or tampered token.
    #[error("token signature is invalid")]
    BadSignature,
    /// `now >= exp`.
    #[error("token has expired")]
    Expired,
    /// `now < nbf`.
    #[error("token is not valid yet")]
    NotYetValid,
    /// `sub` is absent or empty, so there is nobody to authenticate.
    #[error("token has no subject")]
    MissingSubject,
    /// A known claim has the wrong type; the text names which.
    #[error("token has invalid claims: {0}")]
    InvalidClaims(&'static str),
}

impl TokenError {
    /// The code `GET /token/check` answers with (PROTOCOL §1), so a page can
    /// tell an expired token from a forged one without parsing messages.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::TooLong | TokenError::Malformed => "malformed",
            // A foreign algorithm is a token this server did not sign.
            TokenError::UnsupportedAlgorithm | TokenError::BadSignature => "bad_signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::MissingSubject | TokenError::InvalidClaims(_) => "invalid_claims",
        }
    }
}

/// Verifies tokens against one secret.
///
/// Holds an HMAC already keyed with the secret, so each verification is a
/// cheap clone instead of re-deriving the key pads.
#[derive(Clone)]
pub struct Verifier {
    mac: HmacSha256,
}

impl std::fmt::Debug for Verifier {
    /// Never prints key material, so a `Verifier` can sit inside structs that
    /// derive `Debug` and end up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

/// HMAC accepts keys of any length, so this cannot fail; the secret comes from
/// the operator, never from a client.
fn keyed_mac(secret: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length")
}

impl Verifier {
    /// Builds a verifier for tokens signed with `secret` (the same bytes
    /// given to [`sign`]).
    pub fn new(secret: &[u8]) -> Self {
        Verifier {
            mac: keyed_mac(secret),
        }
    }

    /// Checks `token` and returns who it speaks for.
    ///
    /// `now_secs` is seconds since the Unix epoch; time is a parameter so
    /// tests can use a fake clock. Checks run in a fixed order (length,
    /// structure, algorithm, signature, claims, `sub`, `rooms`, `nbf`, `exp`)
    /// so nothing in the claims is trusted before the signature is.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Identity, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }

        // Exactly three parts: header.payload.signature.
        let (signing_input, sig_b64) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let (header_b64, payload_b64) =
            signing_input.split_once('.').ok_or(TokenError::Malformed)?;
        if payload_b64.contains('.') {
            return Err(TokenError::Malformed);
        }

        // Header: pin the algorithm before any cryptography.
        let header = decode_object(header_b64)?;
        match header.get("alg") {
            Some(Value::String(alg)) if alg == "HS256" => {}
            _ => return Err(TokenError::UnsupportedAlgorithm),
        }
        if header.contains_key("crit") {
            return Err(TokenError::Malformed);
        }

        // Signature, in constant time.
        let signature = decode_b64(sig_b64)?;
        let mut mac = self.mac.clone();
        mac.update(signing_input.as_bytes());
        mac.verify_slice(&signature)
            .map_err(|_| TokenError::BadSignature)?;

        // Claims: only now are they trustworthy.
        let claims = decode_object(payload_b64)?;

        let user_id = match claims.get("sub") {
            None => return Err(TokenError::MissingSubject),
            Some(Value::String(s)) if s.is_empty() => return Err(TokenError::MissingSubject),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(TokenError::InvalidClaims("sub must be a string")),
        };

        let name = match claims.get("name") {
            Some(Value::String(n)) if !n.is_empty() => n.clone(),
            _ => user_id.clone(),
        };

        let rooms = match claims.get("rooms") {
            None => RoomAccess::Every,
            Some(Value::Array(items)) => {
                let mut patterns = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(p) => patterns.push(p.clone()),
                        _ => {
                            return Err(TokenError::InvalidClaims(
                                "rooms must contain only strings",
                            ));
                        }
                    }
                }
                if patterns.iter().any(|p| p == "*") {
                    RoomAccess::Every
                } else {
                    RoomAccess::Patterns(patterns)
                }
            }
            Some(_) => return Err(TokenError::InvalidClaims("rooms must be an array")),
        };

        let nbf = numeric_date(&claims, "nbf", "nbf must be a number")?;
        let exp = numeric_date(&claims, "exp", "exp must be a number")?;

        if let Some(nbf) = nbf
            && now_secs < nbf
        {
            return Err(TokenError::NotYetValid);
        }
        if let Some(exp) = exp
            && now_secs >= exp
        {
            return Err(TokenError::Expired);
        }

        Ok(Identity {
            user_id,
            name,
            expires_at: exp,
            rooms,
        })
    }
}

/// Strict base64url: no padding, canonical trailing bits only.
fn decode_b64(part: &str) -> Result<Vec<u8>, TokenError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed)
}

/// Decodes one base64url part that must hold a JSON object.
fn decode_object(part: &str) -> Result<Map<String, Value>, TokenError> {
    let bytes = decode_b64(part)?;
    serde_json::from_slice::<Map<String, Value>>(&bytes).map_err(|_| TokenError::Malformed)
}

/// Reads an optional NumericDate claim as whole seconds.
///
/// Fractional values are rounded up and negative ones clamp to 0; with an
/// integer clock this gives the same answers as comparing the exact value
/// (`now < exp`, `now >= nbf`). Non-numbers, `null` included, are rejected.
fn numeric_date(
    claims: &Map<String, Value>,
    key: &str,
    err: &'static str,
) -> Result<Option<u64>, TokenError> {
    match claims.get(key) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => Ok(Some(v)),
            // `as` saturates: negatives become 0, huge values u64::MAX.
            None => n
                .as_f64()
                .map(|f| Some(f.ceil() as u64))
                .ok_or(TokenError::InvalidClaims(err)),
        },
        Some(_) => Err(TokenError::InvalidClaims(err)),
    }
}

/// What to put in a minted token.
///
/// Used by demo mode and tests to issue tokens this server will accept;
/// `None` fields are left out of the token entirely.
#[derive(Debug, Clone, Default)]
pub struct TokenClaims {
    /// User id (`sub`); must be non-empty for the token to verify.
    pub sub: String,
    /// Display name (`name`); omitted means "use `sub`".
    pub name: Option<String>,
    /// Expiry (`exp`) in seconds since the epoch; omitted means no expiry.
    pub expires_at: Option<u64>,
    /// Room patterns (`rooms`); omitted means every room.
    pub rooms: Option<Vec<String>>,
}

/// Signs `claims` as an HS256 JWT that [`Verifier`] with the same secret
/// accepts, so demo mode and tests never need an external token issuer.
pub fn sign(secret: &[u8], claims: &TokenClaims) -> String {
    let header = r#"{"alg":"HS256","typ":"JWT"}"#;

    let mut body = Map::new();
    body.insert("sub".to_owned(), Value::String(claims.sub.clone()));
    if let Some(name) = &claims.name {
        body.insert("name".to_owned(), Value::String(name.clone()));
    }
    if let Some(exp) = claims.expires_at {
        body.insert("exp".to_owned(), Value::from(exp));
    }
    if let Some(rooms) = &claims.rooms {
        body.insert(
            "rooms".to_owned(),
            Value::Array(rooms.iter().cloned().map(Value::String).collect()),
        );
    }
    let body = Value::Object(body).to_string();

    let mut token = URL_SAFE_NO_PAD.encode(header);
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(body));

    let mut mac = keyed_mac(secret);
    mac.update(token.as_bytes());
    let signature = mac.finalize().into_bytes();

    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(signature));
    token
}

/// A fresh secret for demo mode, where no operator supplied one: 32 bytes
/// from the OS RNG as 64 lowercase hex characters, printable and pasteable.
///
/// Panics only if the operating system cannot provide randomness, in which
/// case no safe secret could be made anyway.
pub fn random_secret() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("operating system random number generator failed");
    let mut out = String::with_capacity(64);
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"test-secret";
    const NOW: u64 = 1_700_000_000;

    fn claims(sub: &str) -> TokenClaims {
        TokenClaims {
            sub: sub.to_owned(),
            ..TokenClaims::default()
        }
    }

    fn b64(data: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(data)
    }

    /// Builds a token from raw header/claims JSON, correctly HS256-signed.
    fn raw_hs256(header: &str, body: &str, secret: &[u8]) -> String {
        let input = format!("{}.{}", b64(header.as_bytes()), b64(body.as_bytes()));
        let mut mac = HmacSha256::new_from_slice(secret).unwrap();
        mac.update(input.as_bytes());
        format!("{input}.{}", b64(&mac.finalize().into_bytes()))
    }

    fn hs256_claims(body: &str) -> String {
        raw_hs256(r#"{"alg":"HS256","typ":"JWT"}"#, body, SECRET)
    }

    fn verify(token: &str) -> Result<Identity, TokenError> {
        Verifier::new(SECRET).verify(token, NOW)
    }

    #[test]
    fn round_trip() {
        let c = TokenClaims {
            sub: "u1".into(),
            name: Some("Alice".into()),
            expires_at: Some(NOW + 60),
            rooms: Some(vec!["lobby".into(), "team:*".into()]),
        };
        let id = verify(&sign(SECRET, &c)).unwrap();
        assert_eq!(
            id,
            Identity {
                user_id: "u1".into(),
                name: "Alice".into(),
                expires_at: Some(NOW + 60),
                rooms: RoomAccess::Patterns(vec!["lobby".into(), "team:*".into()]),
            }
        );
    }

    #[test]
    fn sign_omits_absent_claims() {
        let token = sign(SECRET, &claims("u1"));
        let payload = token.split('.').nth(1).unwrap();
        let json: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(json, serde_json::json!({"sub": "u1"}));
        let header = token.split('.').next().unwrap();
        let json: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
        assert_eq!(json, serde_json::json!({"alg": "HS256", "typ": "JWT"}));
    }

    #[test]
    fn name_defaults_to_sub() {
        let id = verify(&sign(SECRET, &claims("u1"))).unwrap();
        assert_eq!(id.name, "u1");
        assert_eq!(id.rooms, RoomAccess::Every);
        assert_eq!(id.expires_at, None);

        let id = verify(&hs256_claims(r#"{"sub":"u1","name":""}"#)).unwrap();
        assert_eq!(id.name, "u1");
        let id = verify(&hs256_claims(r#"{"sub":"u1","name":42}"#)).unwrap();
        assert_eq!(id.name, "u1");
    }

    #[test]
    fn unknown_claims_and_iat_ignored() {
        let id = verify(&hs256_claims(r#"{"sub":"u1","iat":"junk","foo":[1,2]}"#)).unwrap();
        assert_eq!(id.user_id, "u1");
        let token = raw_hs256(
            r#"{"alg":"HS256","typ":42,"kid":"k"}"#,
            r#"{"sub":"u1"}"#,
            SECRET,
        );
        assert!(verify(&token).is_ok());
    }

    #[test]
    fn wrong_secret() {
        let token = sign(b"other-secret", &claims("u1"));
        assert_eq!(verify(&token), Err(TokenError::BadSignature));
    }

    #[test]
    fn alg_none_rejected() {
        let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64(br#"{"sub":"u1"}"#);
        assert_eq!(
            verify(&format!("{header}.{body}.")),
            Err(TokenError::UnsupportedAlgorithm)
        );
        // Without any signature part at all.
        assert!(verify(&format!("{header}.{body}")).is_err());
        // With a bogus non-empty signature.
        assert_eq!(
            verify(&format!("{header}.{body}.{}", b64(b"sig"))),
            Err(TokenError::UnsupportedAlgorithm)
        );
        // Even with a signature that is valid HS256 over the same input.
        let token = raw_hs256(r#"{"alg":"none"}"#, r#"{"sub":"u1"}"#, SECRET);
        assert_eq!(verify(&token), Err(TokenError::UnsupportedAlgorithm));
        // Case variants are not HS256 either.
        let token = raw_hs256(r#"{"alg":"hs256"}"#, r#"{"sub":"u1"}"#, SECRET);
        assert_eq!(verify(&token), Err(TokenError::UnsupportedAlgorithm));
    }

    #[test]
    fn alg_hs512_rejected() {
        use sha2::Sha512;
        let input = format!(
            "{}.{}",
            b64(br#"{"alg":"HS512","typ":"JWT"}"#),
            b64(br#"{"sub":"u1"}"#)
        );
        let mut mac = Hmac::<Sha512>::new_from_slice(SECRET).unwrap();
        mac.update(input.as_bytes());
        let token = format!("{input}.{}", b64(&mac.finalize().into_bytes()));
        assert_eq!(verify(&token), Err(TokenError::UnsupportedAlgorithm));
    }

    #[test]
    fn other_algs_rejected() {
        for header in [
            r#"{"typ":"JWT"}"#,
            r#"{"alg":"RS256"}"#,
            r#"{"alg":null}"#,
            r#"{"alg":["HS256"]}"#,
        ] {
            let token = raw_hs256(header, r#"{"sub":"u1"}"#, SECRET);
            assert_eq!(
                verify(&token),
                Err(TokenError::UnsupportedAlgorithm),
                "{header}"
            );
        }
    }

    #[test]
    fn crit_header_rejected() {
        let token = raw_hs256(
            r#"{"alg":"HS256","crit":["b64"],"b64":false}"#,
            r#"{"sub":"u1"}"#,
            SECRET,
        );
        assert_eq!(verify(&token), Err(TokenError::Malformed));
    }

    #[test]
    fn expiry_is_exact() {
        let mut c = claims("u1");
        c.expires_at = Some(NOW);
        let token = sign(SECRET, &c);
        let v = Verifier::new(SECRET);
        assert_eq!(v.verify(&token, NOW), Err(TokenError::Expired));
        assert_eq!(v.verify(&token, NOW + 1), Err(TokenError::Expired));
        assert_eq!(v.verify(&token, NOW - 1).unwrap().expires_at, Some(NOW));
    }

    #[test]
    fn fractional_and_negative_dates() {
        let v = Verifier::new(SECRET);
        let token = hs256_claims(r#"{"sub":"u1","exp":100.5}"#);
        assert_eq!(v.verify(&token, 100).unwrap().expires_at, Some(101));
        assert_eq!(v.verify(&token, 101), Err(TokenError::Expired));

        let token = hs256_claims(r#"{"sub":"u1","exp":-5}"#);
        assert_eq!(v.verify(&token, 0), Err(TokenError::Expired));

        let token = hs256_claims(r#"{"sub":"u1","nbf":-5}"#);
        assert!(v.verify(&token, 0).is_ok());
        let token = hs256_claims(r#"{"sub":"u1","nbf":99.5}"#);
        assert_eq!(v.verify(&token, 99), Err(TokenError::NotYetValid));
        assert!(v.verify(&token, 100).is_ok());
    }

    #[test]
    fn nbf_enforced() {
        let v = Verifier::new(SECRET);
        let token = hs256_claims(&format!(r#"{{"sub":"u1","nbf":{}}}"#, NOW + 1));
        assert_eq!(v.verify(&token, NOW), Err(TokenError::NotYetValid));
        assert!(v.verify(&token, NOW + 1).is_ok());

        let token = hs256_claims(&format!(r#"{{"sub":"u1","nbf":{NOW}}}"#));
        assert!(v.verify(&token, NOW).is_ok());
    }

    #[test]
    fn dates_must_be_numbers() {
        for body in [
            r#"{"sub":"u1","exp":"9999999999"}"#,
            r#"{"sub":"u1","exp":null}"#,
            r#"{"sub":"u1","nbf":true}"#,
            r#"{"sub":"u1","nbf":[1]}"#,
        ] {
            assert!(
                matches!(
                    verify(&hs256_claims(body)),
                    Err(TokenError::InvalidClaims(_))
                ),
                "{body}"
            );
        }
    }

    #[test]
    fn subject_required() {
        assert_eq!(
            verify(&hs256_claims(r#"{"name":"x"}"#)),
            Err(TokenError::MissingSubject)
        );
        assert_eq!(
            verify(&sign(SECRET, &claims(""))),
            Err(TokenError::MissingSubject)
        );
        assert!(matches!(
            verify(&hs256_claims(r#"{"sub":42}"#)),
            Err(TokenError::InvalidClaims(_))
        ));
        assert!(matches!(
            verify(&hs256_claims(r#"{"sub":null}"#)),
            Err(TokenError::InvalidClaims(_))
        ));
    }

    #[test]
    fn rooms_claim_shape() {
        assert!(matches!(
            verify(&hs256_claims(r#"{"sub":"u1","rooms":"lobby"}"#)),
            Err(TokenError::InvalidClaims(_))
        ));
        assert!(matches!(
            verify(&hs256_claims(r#"{"sub":"u1","rooms":null}"#)),
            Err(TokenError::InvalidClaims(_))
        ));
        assert!(matches!(
            verify(&hs256_claims(r#"{"sub":"u1","rooms":["lobby",7]}"#)),
            Err(TokenError::InvalidClaims(_))
        ));
    }

    #[test]
    fn room_patterns() {
        let exact = RoomAccess::Patterns(vec!["lobby".into()]);
        assert!(exact.allows("lobby"));
        assert!(!exact.allows("lobby2"));
        assert!(!exact.allows("lobb"));

        let prefix = RoomAccess::Patterns(vec!["team:*".into()]);
        assert!(prefix.allows("team:"));
        assert!(prefix.allows("team:a"));
        assert!(!prefix.allows("teamx"));
        assert!(!prefix.allows("team"));

        let none = RoomAccess::Patterns(vec![]);
        assert!(!none.allows("lobby"));
        assert!(!none.allows(""));

        assert!(RoomAccess::Every.allows("anything"));
        assert!(RoomAccess::Patterns(vec!["*".into()]).allows("anything"));
    }

    #[test]
    fn rooms_claim_to_access() {
        let mut c = claims("u1");
        c.rooms = Some(vec!["*".into()]);
        let id = verify(&sign(SECRET, &c)).unwrap();
        assert_eq!(id.rooms, RoomAccess::Every);
        assert!(id.rooms.allows("x"));

        c.rooms = Some(vec![]);
        let id = verify(&sign(SECRET, &c)).unwrap();
        assert_eq!(id.rooms, RoomAccess::Patterns(vec![]));
        assert!(!id.rooms.allows("x"));

        c.rooms = Some(vec!["team:*".into()]);
        let id = verify(&sign(SECRET, &c)).unwrap();
        assert!(id.rooms.allows("team:"));
        assert!(id.rooms.allows("team:a"));
        assert!(!id.rooms.allows("teamx"));
    }

    #[test]
    fn malformed_inputs() {
        let good = sign(SECRET, &claims("u1"));
        let parts: Vec<&str> = good.split('.').collect();
        let cases = [
            String::new(),
            ".".into(),
            "..".into(),
            "...".into(),
            format!("{}.{}", parts[0], parts[1]),
            format!("{good}.{}", parts[2]),
            format!("{}.!!!.{}", parts[0], parts[2]),
            format!("***.{}.{}", parts[1], parts[2]),
            format!("{}.{}.%%%", parts[0], parts[1]),
            format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
            format!("{}.{}.{}", b64(b"not json"), parts[1], parts[2]),
            format!("{}.{}.{}", b64(b"[1,2]"), parts[1], parts[2]),
            "\u{0}\u{ffff}.é.ü".into(),
        ];
        for token in &cases {
            assert!(verify(token).is_err(), "{token:?}");
        }
        // Header fine, claims not a JSON object (correctly signed).
        for body in ["[1,2]", "\"sub\"", "null", "not json", ""] {
            assert_eq!(
                verify(&hs256_claims(body)),
                Err(TokenError::Malformed),
                "{body}"
            );
        }
    }

    #[test]
    fn tampered_payload_rejected() {
        let good = sign(SECRET, &claims("u1"));
        let parts: Vec<&str> = good.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], b64(br#"{"sub":"admin"}"#), parts[2]);
        assert_eq!(verify(&forged), Err(TokenError::BadSignature));

        // Flip one signature character.
        let mut sig = parts[2].to_owned();
        let last = if sig.ends_with('A') { "B" } else { "A" };
        sig.replace_range(sig.len() - 1.., last);
        let forged = format!("{}.{}.{sig}", parts[0], parts[1]);
        assert!(verify(&forged).is_err());

        // Truncated signature.
        let forged = format!("{}.{}.{}", parts[0], parts[1], &parts[2][..10]);
        assert!(verify(&forged).is_err());
    }

    #[test]
    fn single_byte_mutations_never_verify() {
        let mut c = claims("u1");
        c.rooms = Some(vec!["team:*".into()]);
        let good = sign(SECRET, &c);
        for i in 0..good.len() {
            for replacement in ['A', 'B', '_', '-', '.', '=', ' ', 'é'] {
                let mut bad = good.clone();
                bad.replace_range(i..=i, replacement.encode_utf8(&mut [0; 4]));
                if bad != good {
                    assert!(verify(&bad).is_err(), "{bad}");
                }
            }
        }
    }

    #[test]
    fn length_limit() {
        let mut c = claims("u1");
        c.name = Some("n".repeat(9000));
        let token = sign(SECRET, &c);
        assert!(token.len() > MAX_TOKEN_LEN);
        assert_eq!(verify(&token), Err(TokenError::TooLong));
        assert_eq!(verify(&"a".repeat(8193)), Err(TokenError::TooLong));

        // A valid token just under the limit still verifies.
        c.name = Some("n".repeat(5800));
        let token = sign(SECRET, &c);
        assert!(token.len() <= MAX_TOKEN_LEN);
        assert!(verify(&token).is_ok());
    }

    #[test]
    fn random_secret_shape() {
        let a = random_secret();
        let b = random_secret();
        assert_eq!(a.len(), 64);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        );
        assert_ne!(a, b);
    }

    #[test]
    fn verifier_debug_hides_key() {
        let s = format!("{:?}", Verifier::new(b"supersecret"));
        assert!(!s.contains("supersecret"));
    }
}
