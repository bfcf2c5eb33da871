//! The request target's query and the `Cookie` header: parameters, cookies
//! and percent-decoding.

use super::request::header_lines;

/// The raw (still encoded) value of the first query parameter whose decoded
/// name is `key`; a parameter without `=` has an empty value.
pub(crate) fn query_param<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(name.as_bytes(), true)? == key.as_bytes()).then_some(value)
    })
}

/// The value of the first cookie called `name`, across all `Cookie` lines.
pub(crate) fn cookie<'h>(headers: &'h [httparse::Header<'_>], name: &[u8]) -> Option<&'h [u8]> {
    header_lines(headers, "cookie").find_map(|line| {
        line.split(|b| *b == b';').find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            let (cookie_name, value) = pair.split_at(eq);
            if cookie_name.trim_ascii() != name {
                return None;
            }
            let value = value.get(1..).unwrap_or_default().trim_ascii();
            // RFC 6265 allows a value wrapped in double quotes.
            let value = value
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(value);
            Some(value)
        })
    })
}

/// The value of one hex digit.
fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decode `%XX` escapes (and `+` as a space when `plus_as_space`, as in a
/// query); `None` when an escape is broken. Never longer than the input.
pub(crate) fn percent_decode(input: &[u8], plus_as_space: bool) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len());
    let mut bytes = input.iter().copied();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let high = bytes.next().and_then(hex_digit)?;
                let low = bytes.next().and_then(hex_digit)?;
                out.push(high << 4 | low);
            }
            b'+' if plus_as_space => out.push(b' '),
            _ => out.push(b),
        }
    }
    Some(out)
}

/// Whether every `%` is followed by two hex digits, without allocating.
pub(super) fn percent_well_formed(input: &[u8]) -> bool {
    let mut bytes = input.iter().copied();
    while let Some(b) = bytes.next() {
        if b == b'%'
            && (bytes.next().and_then(hex_digit).is_none()
                || bytes.next().and_then(hex_digit).is_none())
        {
            return false;
        }
    }
    true
}
