//! # wsbridge
//!
//! A sidecar that lets any plain-HTTP program make a synchronous call to a
//! worker behind a WebSocket. The program sends HTTP to the bridge on
//! loopback; the bridge forwards it as a frame with an id over a persistent,
//! multiplexed wss connection that the worker dialled outbound; the reply
//! frame with the same id completes the HTTP request.
//!
//! ```text
//! app --plain HTTP--> wsbridge (127.0.0.1) ==wss, multiplexed==> worker(s)
//!     <--HTTP reply--           <== reply frame with the same id ==
//! ```
//!
//! # Layout
//!
//! * [`config`] - the typed TOML configuration and its validation.
//! * [`body`] - message bodies, complete or streamed chunk by chunk.
//! * [`protocol`] - the wire protocol v1: frames, limits, encode/decode.
//! * [`bridge`] - the sidecar: HTTP side, worker sessions, registry, routes.
//! * `cluster` - several bridges sharing their workers through NATS: the
//!   connection and the presence of the other bridges.
//! * [`worker`] - the worker library, the upstream agent and the echo handler.
//! * [`tls`] - rustls configs from PEM files and self-signed certificates.
//! * `jobs` - asynchronous calls: job records and their durable store.
//! * [`error`] - caller-facing errors and their HTTP mapping.
//! * [`headers`] - hop-by-hop stripping and header conversion.
//! * `flow` - the per-call credit window both sides spend before body chunks.
//! * `metrics` - counters, histograms and their Prometheus exposition.
//! * `transport` - the batched, stall-bounded WebSocket write half.
//! * [`demo`] - the bridge plus an echo worker over wss on loopback.

pub mod body;
pub mod bridge;
mod cluster;
pub mod config;
pub mod demo;
pub mod error;
mod flow;
pub mod headers;
mod jobs;
mod metrics;
pub mod protocol;
pub mod tls;
mod transport;
pub mod worker;

pub use bridge::{run, Bridge, Listeners};
pub use config::Config;
