//! Why a session ended. Exactly one reason per session: it is the log field
//! and the `reason` label of `mailmoat_sessions_closed_total`.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent QUIT.
    ClientQuit,
    /// The client closed or reset the connection without QUIT.
    ClientClosed,
    IdleTimeout,
    /// A started command line was not finished in time (slowloris).
    LineTimeout,
    /// DATA arrived slower than `timeouts.data_min_rate`.
    SlowData,
    SessionTimeout,
    /// The client did not read what we wrote within `timeouts.write`.
    WriteTimeout,
    /// The client broke the protocol in a way the session cannot survive.
    ProtocolError,
    /// The receiver could not be reached, failed, or broke the protocol.
    UpstreamError,
    /// The receiver ended the session (421 or close).
    UpstreamClosed,
    Shutdown,
    /// Refused by a connection cap or rate limit.
    Limit,
    /// Refused or cut because the client is blocklisted.
    Blocked,
    /// The client's TLS handshake failed or ran out of time.
    TlsFailed,
}

impl CloseReason {
    pub const ALL: [CloseReason; 14] = [
        CloseReason::ClientQuit,
        CloseReason::ClientClosed,
        CloseReason::IdleTimeout,
        CloseReason::LineTimeout,
        CloseReason::SlowData,
        CloseReason::SessionTimeout,
        CloseReason::WriteTimeout,
        CloseReason::ProtocolError,
        CloseReason::UpstreamError,
        CloseReason::UpstreamClosed,
        CloseReason::Shutdown,
        CloseReason::Limit,
        CloseReason::Blocked,
        CloseReason::TlsFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientQuit => "client_quit",
            CloseReason::ClientClosed => "client_closed",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::LineTimeout => "line_timeout",
            CloseReason::SlowData => "slow_data",
            CloseReason::SessionTimeout => "session_timeout",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::UpstreamError => "upstream_error",
            CloseReason::UpstreamClosed => "upstream_closed",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Limit => "limit",
            CloseReason::Blocked => "blocked",
            CloseReason::TlsFailed => "tls_failed",
        }
    }
}
