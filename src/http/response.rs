//! Rendering answers: the response framing every non-`101` answer shares, and
//! the refusals with their standard short body.

use super::request::{Decision, RejectReason};

/// Content type of every refusal body.
const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// Build a complete HTTP/1.1 response with Content-Length, the given content
/// type and `Connection: close`.
///
/// Shared by the refusals here and the shell's plain endpoints so every
/// non-`101` answer is framed the same way. CR and LF are dropped from the
/// content type and extra headers, so a caller passing a client-influenced
/// value cannot split the response.
pub(crate) fn response(
    status: u16,
    content_type: &str,
    body: &[u8],
    extra_headers: &[(&str, &str)],
) -> Vec<u8> {
    response_with(status, content_type, body, extra_headers, false)
}

/// As [`response`], saying `Connection: keep-alive` when `keep_alive`.
pub(crate) fn response_with(
    status: u16,
    content_type: &str,
    body: &[u8],
    extra_headers: &[(&str, &str)],
    keep_alive: bool,
) -> Vec<u8> {
    let mut head = String::with_capacity(128);
    head.push_str("HTTP/1.1 ");
    head.push_str(&status.to_string());
    head.push(' ');
    head.push_str(reason_phrase(status));
    head.push_str("\r\nContent-Type: ");
    push_field(&mut head, content_type);
    head.push_str("\r\nContent-Length: ");
    head.push_str(&body.len().to_string());
    head.push_str(if keep_alive {
        "\r\nConnection: keep-alive\r\n"
    } else {
        "\r\nConnection: close\r\n"
    });
    for (name, value) in extra_headers {
        push_field(&mut head, name);
        head.push_str(": ");
        push_field(&mut head, value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Append a header name or value without any CR or LF.
fn push_field(out: &mut String, field: &str) {
    out.extend(field.chars().filter(|c| *c != '\r' && *c != '\n'));
}

/// The reason phrase for the statuses this server sends; others get an empty
/// phrase, which HTTP/1.1 allows.
fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// The bytes of a refusal with the standard short body, for the shell when
/// it refuses after a decision (the last `--max-connections` slot went to
/// another loop meanwhile).
pub(crate) fn refusal(reason: RejectReason) -> Vec<u8> {
    match reject(reason) {
        Decision::Reject { response, .. } => response,
        _ => Vec::new(),
    }
}

/// A refusal with the standard short body.
pub(crate) fn reject(reason: RejectReason) -> Decision {
    reject_with(reason, &[])
}

/// A refusal with extra headers (`Allow`, `Sec-WebSocket-Version`, `Upgrade`).
pub(crate) fn reject_with(reason: RejectReason, extra_headers: &[(&str, &str)]) -> Decision {
    let status = reason.status();
    let body = format!("{status} {}\n", reason_phrase(status));
    Decision::Reject {
        reason,
        response: response(status, TEXT_PLAIN, body.as_bytes(), extra_headers),
    }
}
