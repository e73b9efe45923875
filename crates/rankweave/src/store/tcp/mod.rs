//! The TCP rendezvous store: a server ([`TcpStoreServer`]) that rank 0 or the
//! launcher hosts, and a client ([`TcpStore`]) every rank uses.
//!
//! The wire format is described in [`crate::store::protocol`]. One
//! connection carries one request at a time; the server serves every
//! connection from one event-loop thread and parks blocked `get` and `wait`
//! requests as data, so a client blocked in `get` or `wait` never delays
//! another (see the `server` module for the design and its limits). With `RANKWEAVE_TOKEN` set (or a token given to the
//! builders), both sides authenticate each connection first.

mod client;
mod server;

pub(crate) use client::join_host_port;
pub use client::{TcpStore, TcpStoreBuilder};
pub use server::{
    TcpStoreServer, TcpStoreServerBuilder, DEFAULT_FD_RESERVE, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_WAIT,
    DEFAULT_PENDING_IDLE_TIMEOUT, DEFAULT_WRITE_TIMEOUT,
};
