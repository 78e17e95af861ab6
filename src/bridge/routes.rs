//! Path -> service routing: the longest matching prefix wins, matched on whole
//! path segments; unmatched paths go to `default_service` if there is one.

use std::{sync::Arc, time::Duration};

use crate::{config::Config, error::CallError};

/// What a request is routed to, with its effective limits.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The service name.
    pub(crate) service: Arc<str>,
    /// Deadline for the whole call.
    pub(crate) request_timeout: Duration,
    /// Largest request body.
    pub(crate) max_body: usize,
}

/// The compiled routing table.
pub(crate) struct Router {
    /// `(prefix without trailing '/', target)`, longest prefix first.
    routes: Vec<(String, Target)>,
    default: Option<Target>,
}

impl Router {
    pub(crate) fn new(config: &Config) -> Router {
        let base = |service: &str| Target {
            service: Arc::from(service),
            request_timeout: config.http.request_timeout,
            max_body: config.http.max_body.bytes(),
        };
        let mut routes: Vec<(String, Target)> = config
            .routes
            .iter()
            .map(|r| {
                let mut t = base(&r.service);
                if let Some(timeout) = r.request_timeout {
                    t.request_timeout = timeout;
                }
                if let Some(max) = r.max_body {
                    t.max_body = max.bytes();
                }
                (r.prefix.trim_end_matches('/').to_owned(), t)
            })
            .collect();
        routes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Router {
            routes,
            default: config.default_service.as_deref().map(base),
        }
    }

    /// The target for a request path, or `no_route`.
    pub(crate) fn route(&self, path: &str) -> Result<Target, CallError> {
        self.resolve(path)
            .cloned()
            .ok_or_else(|| CallError::NoRoute {
                path: path.to_owned(),
            })
    }

    /// The target for a request path (without the query).
    pub(crate) fn resolve(&self, path: &str) -> Option<&Target> {
        self.routes
            .iter()
            .find(|(prefix, _)| {
                // "/" (stored as "") matches everything; otherwise the prefix
                // must end at a segment boundary.
                path.strip_prefix(prefix.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
            .map(|(_, t)| t)
            .or(self.default.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(default: bool) -> Router {
        let text = format!(
            r#"
            {}
            [http]
            listen = "127.0.0.1:0"
            [workers]
            listen = "127.0.0.1:0"
            tls = false
            tokens = ["t"]
            [[routes]]
            prefix = "/orders"
            service = "orders"
            [[routes]]
            prefix = "/orders/admin/"
            service = "admin"
            request_timeout = "2s"
            "#,
            if default {
                "default_service = \"fallback\""
            } else {
                ""
            }
        );
        Router::new(&Config::parse(&text).expect("valid"))
    }

    fn service(r: &Router, path: &str) -> Option<String> {
        r.resolve(path).map(|t| t.service.to_string())
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let r = router(true);
        assert_eq!(service(&r, "/orders").as_deref(), Some("orders"));
        assert_eq!(service(&r, "/orders/1").as_deref(), Some("orders"));
        assert_eq!(service(&r, "/orders/admin").as_deref(), Some("admin"));
        assert_eq!(service(&r, "/orders/admin/x").as_deref(), Some("admin"));
        assert_eq!(service(&r, "/ordersx").as_deref(), Some("fallback"));
        assert_eq!(
            r.resolve("/orders/admin/x").map(|t| t.request_timeout),
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn no_default_means_no_route() {
        let r = router(false);
        assert_eq!(service(&r, "/elsewhere"), None);
    }
}
