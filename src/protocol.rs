//! The contract of docs/PROTOCOL.md as plain data and pure functions: the
//! records (markets, trades) and their JSON, the WebSocket frames every
//! server message travels in, the doorbell a commit rings (and its signed
//! form, which carries the trade), the client ops of
//! the WebSocket API, and the bodies, routes and errors of the write API.
//!
//! No IO and nothing else of the crate: every parser of untrusted input is
//! here, so it can be unit-tested, property-tested (`tests/it/props.rs`) and
//! fuzzed (`fuzz/`) without a socket or a database.

pub mod client;
pub mod doorbell;
pub mod frame;
pub mod handshake;
pub mod market;
pub mod signed;
pub mod ticker;
pub mod token;
pub mod trade;
pub mod write_api;
