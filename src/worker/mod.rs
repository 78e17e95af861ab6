//! The worker side: a library to serve calls from a bridge, and the agent
//! that serves them from an upstream HTTP server (or echoes them).
//!
//! ```no_run
//! use http::{Request, Response};
//! use wsbridge::{body::Body, worker::{Worker, WorkerConfig}};
//!
//! # async fn demo() -> Result<(), wsbridge::worker::WorkerError> {
//! let config = WorkerConfig::new("wss://bridge.example:8443", "secret", ["orders"]);
//! let worker = Worker::new(config, |req: Request<Body>| async move {
//!     Response::new(req.into_body()) // echo
//! });
//! worker.run(tokio_util::sync::CancellationToken::new()).await
//! # }
//! ```

mod agent;
mod backoff;
mod call;
mod connection;
mod dial;
mod pool;
mod replied;
mod resume;

pub use agent::{echo, echo_as, Upstream};
pub use call::{CallInfo, Handler, HandlerFuture};
pub use connection::WorkerError;
pub use dial::{Status, Worker, WorkerConfig};
