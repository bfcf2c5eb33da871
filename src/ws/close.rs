//! What a failed WebSocket read means for the connection: the close code the
//! contract gives each kind of bad input (§8), or that the peer is gone.
//!
//! Kept apart from the loop so the mapping from tungstenite's errors to close
//! codes is one table, tested without sockets.

use std::io;

use tungstenite::error::ProtocolError;
use tungstenite::protocol::frame::coding::CloseCode;

/// What to do after `WebSocketContext::read` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFailure {
    /// The socket has no more bytes now; wait for the next readiness edge.
    WouldBlock,
    /// A signal interrupted the read; read again.
    Interrupted,
    /// The closing handshake completed: flush our reply, then hang up.
    Closed,
    /// The client broke the protocol: close with this code and reason.
    Close(CloseCode, &'static str),
    /// The peer vanished (reset, or an I/O error): free the connection.
    Gone,
}

/// Classifies a read error, the contract's close code included.
pub fn read_failure(error: &tungstenite::Error) -> ReadFailure {
    match error {
        tungstenite::Error::Io(error) if error.kind() == io::ErrorKind::WouldBlock => {
            ReadFailure::WouldBlock
        }
        tungstenite::Error::Io(error) if error.kind() == io::ErrorKind::Interrupted => {
            ReadFailure::Interrupted
        }
        tungstenite::Error::ConnectionClosed => ReadFailure::Closed,
        tungstenite::Error::Capacity(_) => ReadFailure::Close(CloseCode::Size, "message too big"),
        tungstenite::Error::Utf8(_) => ReadFailure::Close(CloseCode::Invalid, "invalid UTF-8"),
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            ReadFailure::Gone
        }
        tungstenite::Error::Protocol(_) => {
            ReadFailure::Close(CloseCode::Protocol, "protocol error")
        }
        _ => ReadFailure::Gone,
    }
}

/// The close for a binary frame on a rooms connection: messages are JSON
/// text (§3), so binary is unsupported data (1003).
pub const BINARY_REFUSED: (CloseCode, &str) =
    (CloseCode::Unsupported, "binary frames are not accepted");

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::error::CapacityError;

    #[test]
    fn each_bad_input_gets_its_close_code() {
        let too_big = tungstenite::Error::Capacity(CapacityError::MessageTooLong {
            size: 10,
            max_size: 5,
        });
        assert_eq!(
            read_failure(&too_big),
            ReadFailure::Close(CloseCode::Size, "message too big")
        );
        let masked = tungstenite::Error::Protocol(ProtocolError::UnmaskedFrameFromClient);
        assert_eq!(
            read_failure(&masked),
            ReadFailure::Close(CloseCode::Protocol, "protocol error")
        );
        let reset = tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake);
        assert_eq!(read_failure(&reset), ReadFailure::Gone);
        assert_eq!(
            read_failure(&tungstenite::Error::ConnectionClosed),
            ReadFailure::Closed
        );
        let blocked = tungstenite::Error::Io(io::ErrorKind::WouldBlock.into());
        assert_eq!(read_failure(&blocked), ReadFailure::WouldBlock);
        let broken = tungstenite::Error::Io(io::ErrorKind::BrokenPipe.into());
        assert_eq!(read_failure(&broken), ReadFailure::Gone);
        assert_eq!(u16::from(BINARY_REFUSED.0), 1003);
    }
}
