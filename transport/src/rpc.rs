//! Typed request/response calls on bidirectional QUIC streams.
//!
//! A service is a set of [`Method`]s, each with a fixed id, the role that serves it and the
//! roles allowed to call it. One call uses one bidirectional stream:
//!
//! ```text
//! request:  u32 len | u32 method id | u32 timeout ms | rkyv archive of the request (len bytes)
//! response: u32 len | u32 status (0 ok, 1 error)     | rkyv archive of the response or error
//! ```
//!
//! The server validates the archive before decoding it, enforces the caller's role and the
//! call's deadline, and answers a bad frame with an error on that stream only.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use crate::error::{ErrorCode, RemoteError};
use crate::frame::{Frame, Message};
use crate::stream::DataStream;
use crate::tls::Role;

/// A group of methods served by one role.
pub trait Service: 'static {
    /// Name used in logs and errors.
    const NAME: &'static str;
    /// The role of the nodes that serve this service.
    const SERVED_BY: Role;
}

/// One method of a [`Service`].
pub trait Method: Send + Sync + 'static {
    /// The service this method belongs to.
    type Service: Service;
    /// Wire id; unique per endpoint. Id 0 is reserved for the connection hello.
    const ID: u32;
    /// Name used in logs and errors.
    const NAME: &'static str;
    /// Roles allowed to call this method; others are refused with `PermissionDenied`.
    const CALLERS: &'static [Role];
    /// The request type.
    type Request: Message;
    /// The response type.
    type Response: Message;
}

/// Who is on the other end of a connection, as proven by its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The role named in the peer's certificate.
    pub role: Role,
    /// The peer's UDP address.
    pub addr: SocketAddr,
}

/// Status word of a response frame.
pub(crate) const STATUS_OK: u32 = 0;
/// Status word of an error response frame.
pub(crate) const STATUS_ERR: u32 = 1;

/// Wire form of a [`RemoteError`].
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
pub(crate) struct WireError {
    pub(crate) code: u32,
    pub(crate) message: String,
}

/// Method id of the built-in hello that admits a new connection.
pub(crate) const HELLO_ID: u32 = 0;
/// Protocol version exchanged in the hello.
pub(crate) const PROTOCOL_VERSION: u32 = 1;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Handler = Arc<
    dyn Fn(Peer, Frame) -> BoxFuture<Result<rkyv::util::AlignedVec, RemoteError>> + Send + Sync,
>;
type StreamHandler = Arc<dyn Fn(Peer, DataStream) -> BoxFuture<()> + Send + Sync>;

pub(crate) struct Route {
    pub(crate) name: &'static str,
    pub(crate) callers: &'static [Role],
    pub(crate) handler: Handler,
}

/// The handlers an endpoint serves: RPC methods by id and, optionally, incoming data streams.
#[derive(Default)]
pub struct Router {
    pub(crate) routes: HashMap<u32, Route>,
    pub(crate) streams: Option<(&'static [Role], StreamHandler)>,
}

impl Router {
    /// An empty router: the endpoint answers only the hello.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves method `M` with `handler`.
    ///
    /// # Panics
    /// If a handler for the same method id is already registered or `M::ID` is the reserved
    /// hello id: both are programming errors found at start-up, never caused by input.
    pub fn route<M, F, Fut>(mut self, handler: F) -> Self
    where
        M: Method,
        F: Fn(Peer, M::Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<M::Response, RemoteError>> + Send + 'static,
    {
        assert!(M::ID != HELLO_ID, "method id 0 is reserved for the hello");
        let handler = Arc::new(handler);
        let erased: Handler = Arc::new(move |peer, frame: Frame| {
            let handler = handler.clone();
            Box::pin(async move {
                let req = M::Request::decode(&frame).map_err(|e| {
                    RemoteError::new(ErrorCode::BadRequest, format!("{}: {e}", M::NAME))
                })?;
                let resp = handler(peer, req).await?;
                resp.encode().map_err(|e| {
                    RemoteError::new(ErrorCode::Internal, format!("encode response: {e}"))
                })
            })
        });
        let previous = self.routes.insert(
            M::ID,
            Route {
                name: M::NAME,
                callers: M::CALLERS,
                handler: erased,
            },
        );
        assert!(previous.is_none(), "method id {} registered twice", M::ID);
        self
    }

    /// Accepts incoming data streams from peers of the given roles with `handler`.
    pub fn data_streams<F, Fut>(mut self, callers: &'static [Role], handler: F) -> Self
    where
        F: Fn(Peer, DataStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.streams = Some((
            callers,
            Arc::new(move |peer, stream| {
                let handler = handler.clone();
                Box::pin(async move { handler(peer, stream).await })
            }),
        ));
        self
    }
}
