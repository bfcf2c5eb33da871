//! roomcast: a single-binary WebSocket rooms server on a hand-rolled `mio` event loop.
