//! The crate's one error type.
//!
//! Every failure carries enough context for a reader of one log line to know
//! which operation failed, in which group, on which rank, and which peer to
//! look at. After an I/O error, a timeout or a mismatch the group that
//! reported it is poisoned: tear it down (drop it, or `destroy` the
//! coordinator) and build a new one.

use std::io;
use std::time::Duration;

/// Shorthand for `std::result::Result<T, rankweave::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where an error happened: the operation, the group and the ranks involved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// Operation name, e.g. `all_reduce`, `store.get`, `recv_object`.
    pub op: String,
    /// Group unique name (`world:0`, `tp:0`) or store address.
    pub group: String,
    /// This process's rank in the group, when known.
    pub rank: Option<usize>,
    /// The peer rank (group-local) the failure is attributed to, when known.
    pub peer: Option<usize>,
}

impl Context {
    /// A context naming only the operation.
    pub fn op(op: impl Into<String>) -> Self {
        Context { op: op.into(), ..Default::default() }
    }
    /// A context for `op` in `group` on `rank`.
    pub fn new(op: impl Into<String>, group: impl Into<String>, rank: usize) -> Self {
        Context { op: op.into(), group: group.into(), rank: Some(rank), peer: None }
    }
    /// The same context, attributed to `peer`.
    pub fn with_peer(mut self, peer: usize) -> Self {
        self.peer = Some(peer);
        self
    }
}

impl std::fmt::Display for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", if self.op.is_empty() { "<op>" } else { &self.op })?;
        if !self.group.is_empty() {
            write!(f, " in group {}", self.group)?;
        }
        if let Some(r) = self.rank {
            write!(f, " on rank {r}")?;
        }
        if let Some(p) = self.peer {
            write!(f, " (peer rank {p})")?;
        }
        Ok(())
    }
}

/// Every error rankweave returns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A caller passed something invalid (bad rank, dim, size, URL...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A blocking operation passed its deadline.
    #[error("timed out after {waited:?}: {ctx}{}", fmt_detail(detail))]
    Timeout {
        /// Where.
        ctx: Context,
        /// How long it waited.
        waited: Duration,
        /// What it was waiting for (keys, readers, bytes...).
        detail: String,
    },

    /// A peer closed its connection or died mid-operation.
    #[error("peer lost: {ctx}: {detail}")]
    PeerLost {
        /// Where; `ctx.peer` names the lost peer.
        ctx: Context,
        /// What was observed (EOF, connection reset...).
        detail: String,
    },

    /// Ranks called different collectives, or with different sizes/dtypes.
    #[error("collective mismatch: {ctx}: {detail}")]
    Mismatch {
        /// Where; `ctx.peer` names the differing peer when there is one.
        ctx: Context,
        /// What differs, expected vs actual.
        detail: String,
    },

    /// A peer or client sent bytes that do not decode (bad frame, bad version,
    /// oversized length).
    #[error("protocol error: {ctx}: {detail}")]
    Protocol {
        /// Where.
        ctx: Context,
        /// What was wrong with the bytes.
        detail: String,
    },

    /// An operating-system I/O error.
    #[error("I/O error: {ctx}: {source}")]
    Io {
        /// Where.
        ctx: Context,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The rendezvous store refused or failed a request.
    #[error("store error: {0}")]
    Store(String),

    /// Authentication with the store failed (`RANKWEAVE_TOKEN`).
    #[error("unauthorized: {0}")]
    Unauthorized(String),

    /// Serializing or deserializing an object or metadata failed.
    #[error("serialization error: {ctx}: {detail}")]
    Serialization {
        /// Where.
        ctx: Context,
        /// Decoder/encoder message.
        detail: String,
    },

    /// A parallel-state function was called before initialization (the
    /// group or world was never built).
    #[error("not initialized: {0}")]
    NotInitialized(String),

    /// The group or world existed and was destroyed (`destroy`,
    /// `destroy_model_parallel`, `destroy_distributed_environment`); build a
    /// new one.
    #[error("destroyed: {0}")]
    Destroyed(String),

    /// No group of that name is registered (see
    /// [`crate::coordinator::lookup_group`]).
    #[error("not found: {0}")]
    NotFound(String),

    /// A buffer could not be allocated: its size, often declared by a peer
    /// (`ctx.peer`), does not fit in this process's memory.
    #[error("out of memory: {ctx}: cannot allocate {bytes} bytes for {detail}")]
    OutOfMemory {
        /// Where; `ctx.peer` names the peer that declared the size, if any.
        ctx: Context,
        /// The size that was asked for.
        bytes: u64,
        /// What the buffer was for.
        detail: String,
    },

    /// An initialization conflicts with the existing state.
    #[error("already initialized: {0}")]
    AlreadyInitialized(String),

    /// Creating, sizing or mapping shared memory failed.
    #[error("shared memory: {0}")]
    SharedMemory(String),

    /// The group was poisoned by an earlier failure and must be rebuilt.
    #[error("group {group} is unusable after an earlier error ({cause}); destroy it and create a new one")]
    Poisoned {
        /// Group name.
        group: String,
        /// One-line summary of the first error.
        cause: String,
    },

    /// The requested feature is not available in this build or on this platform.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

fn fmt_detail(d: &str) -> String {
    if d.is_empty() {
        String::new()
    } else {
        format!(" waiting for {d}")
    }
}

impl Error {
    /// An `InvalidArgument` from anything printable.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
    /// An `Io` error with context.
    pub fn io(ctx: Context, source: io::Error) -> Self {
        Error::Io { ctx, source }
    }
    /// A `Protocol` error with context.
    pub fn protocol(ctx: Context, detail: impl Into<String>) -> Self {
        Error::Protocol { ctx, detail: detail.into() }
    }
    /// A `Timeout` with context.
    pub fn timeout(ctx: Context, waited: Duration, detail: impl Into<String>) -> Self {
        Error::Timeout { ctx, waited, detail: detail.into() }
    }
    /// True for errors after which the group cannot be used again
    /// (timeouts, lost peers, mismatches, protocol and I/O errors).
    pub fn poisons_group(&self) -> bool {
        matches!(
            self,
            Error::Timeout { .. }
                | Error::PeerLost { .. }
                | Error::Mismatch { .. }
                | Error::Protocol { .. }
                | Error::Io { .. }
                | Error::OutOfMemory { .. }
        )
    }
    /// The peer rank this error is attributed to, when there is one.
    pub fn peer(&self) -> Option<usize> {
        self.context().and_then(|c| c.peer)
    }

    /// The context of errors that carry one.
    pub fn context(&self) -> Option<&Context> {
        match self {
            Error::Timeout { ctx, .. }
            | Error::PeerLost { ctx, .. }
            | Error::Mismatch { ctx, .. }
            | Error::Protocol { ctx, .. }
            | Error::Io { ctx, .. }
            | Error::Serialization { ctx, .. }
            | Error::OutOfMemory { ctx, .. } => Some(ctx),
            _ => None,
        }
    }

    /// Puts a serialization, allocation or protocol error raised below an
    /// operation (a codec's, which names only itself) into that
    /// operation's context `ctx`: its group and rank, and `ctx`'s peer
    /// when it has one; the inner operation stays in brackets (`op
    /// [decode_object]`). An error already placed in another group, and
    /// every other kind, is returned as it is.
    pub fn within(mut self, ctx: Context) -> Error {
        if let Error::Serialization { .. } | Error::OutOfMemory { .. } | Error::Protocol { .. } = self {
            if let Some(c) = self.context_mut() {
                if c.group.is_empty() || c.group == ctx.group {
                    let peer = ctx.peer.or(c.peer);
                    let inner_op = std::mem::take(&mut c.op);
                    *c = ctx;
                    c.peer = peer;
                    if !inner_op.is_empty() && inner_op != c.op {
                        c.op = format!("{} [{inner_op}]", c.op);
                    }
                }
            }
        }
        self
    }

    /// The context of errors that carry one, mutable.
    pub fn context_mut(&mut self) -> Option<&mut Context> {
        match self {
            Error::Timeout { ctx, .. }
            | Error::PeerLost { ctx, .. }
            | Error::Mismatch { ctx, .. }
            | Error::Protocol { ctx, .. }
            | Error::Io { ctx, .. }
            | Error::Serialization { ctx, .. }
            | Error::OutOfMemory { ctx, .. } => Some(ctx),
            _ => None,
        }
    }

    /// Re-attributes an error that happened inside a lower layer (a
    /// coordinator's device or CPU group, its message queue) to the layer
    /// the caller knows: `op` in `group` on `rank`. The inner operation and
    /// group stay in the message, in brackets (`broadcast_tensor_dict
    /// [mq.dequeue in mq:1f2e...] in group tp:0 on rank 1 (peer rank 0)`);
    /// the peer is kept. A [`Error::Poisoned`] of the inner group is renamed
    /// the same way.
    pub fn in_group(mut self, op: &str, group: &str, rank: usize) -> Error {
        if let Error::Poisoned { group: g, cause } = &mut self {
            if g != group {
                *cause = format!("{cause}; inner group {g}");
                *g = group.to_string();
            }
            return self;
        }
        if let Some(ctx) = self.context_mut() {
            if ctx.group == group && (ctx.op == op || ctx.op.starts_with(&format!("{op} ["))) {
                ctx.rank = Some(rank);
                return self;
            }
            let same_op = ctx.op.is_empty() || ctx.op == op;
            let inner = match (same_op, ctx.group.is_empty() || ctx.group == group) {
                (true, true) => String::new(),
                (true, false) => format!(" [in {}]", ctx.group),
                (false, true) => format!(" [{}]", ctx.op),
                (false, false) => format!(" [{} in {}]", ctx.op, ctx.group),
            };
            ctx.op = format!("{op}{inner}");
            ctx.group = group.to_string();
            ctx.rank = Some(rank);
        }
        self
    }
}
