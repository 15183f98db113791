//! microcosm's transport: QUIC (quinn + rustls, ring) with mutual TLS, used by both planes.
//!
//! - **Control plane:** typed request/response calls ([`rpc`]) on bidirectional streams. A
//!   [`Method`] names its id, the role that serves it and the roles allowed to call it; an
//!   [`Endpoint`] serves a [`Router`] of handlers and calls methods on peers, with a deadline
//!   per call and errors ([`RpcError`]) that say whether a retry may help.
//! - **Data plane:** long-lived unidirectional streams ([`stream`]) of framed, rkyv-archived
//!   record batches, received as aligned buffers that are read in place. QUIC flow control is
//!   the backpressure.
//! - **Security:** every connection is mutually authenticated against the cluster CA
//!   ([`tls`]); a certificate names its role (master, executor, client), and a call the role
//!   may not make is refused.
//! - **Robustness:** frames are length-checked before any allocation and validated with
//!   bytecheck; a bad frame fails its stream only, never the connection or the node.
//!
//! ```no_run
//! # async fn demo(dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
//! use microcosm_transport::{Endpoint, Identity, Role, Router, TransportConfig};
//! let identity = Identity::load(dir, Role::Master)?;
//! let endpoint = Endpoint::bind("127.0.0.1:0".parse()?, &identity, TransportConfig::default(), Router::new())?;
//! println!("listening on {}", endpoint.local_addr());
//! # Ok(()) }
//! ```

pub mod config;
pub mod endpoint;
pub mod error;
pub mod frame;
pub mod rpc;
mod socket;
pub mod stream;
pub mod tls;

pub use config::{AckFrequency, TransportConfig};
pub use endpoint::{Connection, ConnectionStats, Endpoint, WeakEndpoint};
pub use error::{EndpointError, ErrorCode, FrameError, RemoteError, RpcError, TlsError};
pub use frame::{Frame, Message};
pub use rpc::{Method, Peer, Router, Service};
pub use stream::{DataSender, DataStream, MAX_DATA_HEADER_BYTES};
pub use tls::{Identity, Role};
