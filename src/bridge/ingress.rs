//! Ingress: messages published elsewhere, pushed to workers. Each
//! `[[ingress.redis]]` subscribes to a Redis channel (with the `redis`
//! crate) and sends every message to every matching worker of its service
//! as a fan-out without replies (`fanout::push`), one message after the
//! other, each once its calls are sent. Redis pub/sub delivers at most
//! once: what is published while the subscription is down is not seen.

use std::{
    collections::VecDeque,
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderValue, Method};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    caller::Caller,
    fanout::{self, Owned},
    routes::Target,
    Shared,
};
use crate::{cluster::presence::Query, config::RedisIngress, protocol};

/// The header naming the channel a pushed message came from.
const CHANNEL_HEADER: &str = "x-redis-channel";

/// Longest wait between two attempts to (re)subscribe.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Runs `[[ingress.redis]]` entry `index` until `shutdown`.
pub(super) async fn redis_channel(shared: Arc<Shared>, index: usize, shutdown: CancellationToken) {
    let Some(entry) = shared
        .settings
        .load()
        .config
        .ingress
        .redis
        .get(index)
        .cloned()
    else {
        return;
    };
    let name = format!("ingress.redis[{index}] (channel {:?})", entry.channel);
    let mut backoff = Duration::from_millis(100);
    loop {
        let subscribed = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = subscribe(&entry) => s,
        };
        match subscribed {
            Ok(pubsub) => {
                info!("{name}: subscribed");
                backoff = Duration::from_millis(100);
                let ended = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    ended = deliver(&shared, &entry, pubsub) => ended,
                };
                warn!("{name}: subscription lost ({ended}); resubscribing");
            }
            // The redis crate's errors name the address, never the password.
            Err(e) => warn!("{name}: cannot subscribe: {e}; retrying in {backoff:?}"),
        }
        let jitter = backoff.mul_f64(fastrand::f64() * 0.5);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// TCP keepalive on the subscription: pub/sub sends nothing while no one
/// publishes, so without probes a Redis that vanished (its host, the path
/// to it) would leave the ingress listening to a dead socket for good.
/// Silence is found within about 15 + 3 x 5 s.
fn tcp() -> redis::io::tcp::TcpSettings {
    let probes = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(15))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(probes)
}

async fn subscribe(entry: &RedisIngress) -> redis::RedisResult<redis::aio::PubSub> {
    use redis::IntoConnectionInfo;
    let info = entry
        .url
        .expose()
        .into_connection_info()?
        .set_tcp_settings(tcp());
    let client = redis::Client::open(info)?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(&entry.channel).await?;
    Ok(pubsub)
}

/// Messages received and not yet pushed are held up to this many bytes;
/// past it (workers slower than the publisher) new ones are dropped and
/// counted: the redis crate reads a subscription into an unbounded queue,
/// so this is the bound on what a publisher can make the bridge hold.
const BACKLOG_BYTES: usize = 64 << 20;

/// One message's push, under way.
type Pushing<'a> = Pin<Box<dyn Future<Output = (usize, usize)> + Send + 'a>>;

/// Pushes each message to the workers, one after the other, until the
/// subscription ends; holds those that arrive meanwhile within
/// [`BACKLOG_BYTES`].
async fn deliver(shared: &Arc<Shared>, entry: &RedisIngress, pubsub: redis::aio::PubSub) -> String {
    let query = Query {
        service: Some(entry.service.clone()),
        meta: entry
            .selector
            .as_deref()
            .map(protocol::parse_selector)
            .and_then(Result::ok)
            .unwrap_or_default(),
        ..Query::default()
    };
    let caller = Arc::new(Caller {
        addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        ip: host_of(entry.url.expose()).into(),
        calls: None,
    });
    let push = |body: Bytes| -> Option<Pushing<'_>> {
        let settings = shared.settings.load_full();
        let target = Target {
            service: entry.service.as_str().into(),
            request_timeout: settings.config.http.request_timeout,
            max_body: settings.config.http.max_body.bytes(),
        };
        let own = Owned {
            shared: shared.clone(),
            settings,
            caller: caller.clone(),
            request_id: request_id(),
            started: Instant::now(),
        };
        Some(Box::pin(fanout::push(
            own,
            target,
            &query,
            head(entry)?,
            body,
        )))
    };
    let mut messages = pubsub.into_on_message();
    let (mut backlog, mut held) = (VecDeque::<Bytes>::new(), 0usize);
    let mut pushing: Option<Pushing<'_>> = None;
    loop {
        if pushing.is_none() {
            if let Some(body) = backlog.pop_front() {
                held -= body.len();
                let Some(started) = push(body) else {
                    return "the configured path is not a valid request".into();
                };
                pushing = Some(started);
            }
        }
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else {
                    return "the connection closed".into();
                };
                let body = Bytes::copy_from_slice(message.get_payload_bytes());
                let max = shared.settings.load().config.http.max_body.bytes();
                if body.len() > max || held + body.len() > BACKLOG_BYTES {
                    if shared.metrics.ingress_dropped() == 1 {
                        warn!(channel = %entry.channel, bytes = body.len(), "a Redis message was dropped: larger than http.max_body, or the workers are behind by 64 MiB (wsbridge_ingress_dropped_total counts them)");
                    }
                    continue;
                }
                held += body.len();
                backlog.push_back(body);
            }
            (reached, sent) = async {
                match pushing.as_mut() {
                    Some(p) => p.await,
                    None => std::future::pending().await,
                }
            } => {
                pushing = None;
                debug!(channel = %entry.channel, reached, sent, "redis message pushed");
                shared.metrics.ingress_message(reached, sent);
            }
        }
    }
}

/// The head of the `POST` each worker gets for a message.
fn head(entry: &RedisIngress) -> Option<Box<http::request::Parts>> {
    let mut req = http::Request::builder()
        .method(Method::POST)
        .uri(entry.path.as_deref().unwrap_or("/"))
        .body(())
        .ok()?;
    let headers = req.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(CHANNEL_HEADER, HeaderValue::from_str(&entry.channel).ok()?);
    Some(Box::new(req.into_parts().0))
}

/// The Redis server's host, the "caller" workers see in `X-Forwarded-For`.
fn host_of(url: &str) -> &str {
    let rest = url.strip_prefix("redis://").unwrap_or(url);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let host = &rest[..end];
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn request_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn the_host_leaves_out_the_password_and_port() {
        assert_eq!(host_of("redis://127.0.0.1:6379"), "127.0.0.1");
        assert_eq!(
            host_of("redis://:s3cret@cache.internal:6380/2"),
            "cache.internal"
        );
        assert_eq!(host_of("redis://user:p@ss@h"), "h");
        assert_eq!(host_of("redis://[::1]:6379"), "[::1]");
    }
}
