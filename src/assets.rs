//! The demo page and its client module, embedded in the binary so that the
//! single binary serves them with no files beside it.

/// `GET /`: the demo chat page.
pub const INDEX_HTML: &[u8] = include_bytes!("../web/index.html");

/// `GET /roomcast.js`: the browser client module the page uses.
pub const CLIENT_JS: &[u8] = include_bytes!("../web/roomcast.js");
