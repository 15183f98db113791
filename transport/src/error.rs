//! Error types of the transport: one enum per domain (certificates, endpoints, frames, calls).

use std::path::PathBuf;

use crate::tls::Role;

/// Certificate generation and loading failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing a certificate file failed.
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    /// A PEM file could not be parsed.
    #[error("{0}: not a valid PEM certificate or key: {1}")]
    BadPem(PathBuf, String),
    /// A certificate could not be generated.
    #[error("certificate generation failed: {0}")]
    Generate(#[source] rcgen::Error),
    /// A certificate is malformed or names no (or several) microcosm roles.
    #[error("bad certificate: {0}")]
    BadCert(String),
    /// A certificate was loaded for one role but grants another.
    #[error("certificate grants role {found}, expected {expected}")]
    RoleMismatch {
        /// The role the caller asked for.
        expected: Role,
        /// The role the certificate names.
        found: Role,
    },
    /// A role name is not one of master, executor, client.
    #[error("unknown role {0:?} (expected master, executor or client)")]
    UnknownRole(String),
    /// `certs init` would overwrite an existing CA.
    #[error("{0} already holds a cluster CA; refusing to overwrite it")]
    AlreadyInitialized(PathBuf),
    /// rustls rejected the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Failures creating an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Binding the UDP socket failed.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The transport configuration is invalid.
    #[error("invalid transport config: {0}")]
    Config(String),
}

/// A frame on a stream could not be read or is invalid. Affects that stream only.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix was zero.
    #[error("empty frame (length 0)")]
    Empty,
    /// The length prefix exceeds the configured maximum.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// Configured maximum.
        max: u32,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes announced.
        want: usize,
    },
    /// More bytes followed a frame that must be the last on its stream.
    #[error("trailing bytes after the frame")]
    TrailingBytes,
    /// The payload is not a valid archive of the expected type.
    #[error("invalid archive: {0}")]
    InvalidArchive(String),
    /// The stream failed underneath.
    #[error("stream error: {0}")]
    Stream(String),
}

/// Error codes carried by a remote error. Codes below 100 are the transport's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// The handler failed unexpectedly.
    Internal = 1,
    /// The request frame was malformed.
    BadRequest = 2,
    /// No handler for the method id.
    UnknownMethod = 3,
    /// The caller's role may not call this method.
    PermissionDenied = 4,
    /// The server gave up at the call's deadline.
    DeadlineExceeded = 5,
    /// The server cannot serve right now (e.g. no leader); retry, possibly elsewhere.
    Unavailable = 6,
    /// The named object does not exist.
    NotFound = 7,
    /// The request was understood but is invalid.
    InvalidArgument = 8,
    /// The request conflicts with the current state.
    FailedPrecondition = 9,
}

/// An error returned by the remote handler: a code and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("remote error {code}: {message}")]
pub struct RemoteError {
    /// Numeric code; see [`ErrorCode`] for the transport's own codes.
    pub code: u32,
    /// Human-readable message.
    pub message: String,
}

impl RemoteError {
    /// Builds a remote error with one of the transport's codes.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code: code as u32,
            message: message.into(),
        }
    }

    /// Whether the code is `code`.
    pub fn is(&self, code: ErrorCode) -> bool {
        self.code == code as u32
    }

    /// Whether retrying the same call (possibly on another node) may succeed.
    pub fn is_retryable(&self) -> bool {
        self.is(ErrorCode::Unavailable) || self.is(ErrorCode::DeadlineExceeded)
    }
}

/// A call failed. [`RpcError::is_retryable`] says whether to try again.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The call's deadline passed before a response arrived.
    #[error("call timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// No connection to the peer could be made.
    #[error("{addr} unreachable: {reason}")]
    Unreachable {
        /// The peer's address.
        addr: std::net::SocketAddr,
        /// Why.
        reason: String,
    },
    /// The connection failed during the call.
    #[error("connection to {addr} lost: {reason}")]
    ConnectionLost {
        /// The peer's address.
        addr: std::net::SocketAddr,
        /// Why.
        reason: String,
    },
    /// The remote handler answered with an error.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The response could not be decoded.
    #[error("bad response frame: {0}")]
    BadFrame(#[from] FrameError),
    /// The request could not be encoded.
    #[error("cannot encode request: {0}")]
    Encode(String),
}

impl RpcError {
    /// Whether retrying may succeed: timeouts, unreachable peers, lost connections and
    /// retryable remote errors.
    pub fn is_retryable(&self) -> bool {
        match self {
            RpcError::Timeout(_)
            | RpcError::Unreachable { .. }
            | RpcError::ConnectionLost { .. } => true,
            RpcError::Remote(e) => e.is_retryable(),
            RpcError::BadFrame(_) | RpcError::Encode(_) => false,
        }
    }

    /// The remote error, if the peer answered with one.
    pub fn remote(&self) -> Option<&RemoteError> {
        match self {
            RpcError::Remote(e) => Some(e),
            _ => None,
        }
    }
}
