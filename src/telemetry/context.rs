//! A request's context: what its audit record and span learn on the way in (the caller, the
//! resource, whether the caches answered). The per-RPC layer creates one per request and makes it
//! the task's current context; the auth interceptor and the services note into it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// Longest resource name kept in an audit record or span (request fields are caller-chosen).
const MAX_RESOURCE: usize = 512;

/// What a request's audit record and span learn on the way in: the layer puts one in the request
/// extensions (and in a task-local for the request's future); the auth interceptor notes the
/// caller, the service the resource, the caches whether they hit.
#[derive(Clone, Default, Debug)]
pub struct RequestContext {
    /// Whether an audit record or a span will read the notes (else only `cache_hit` is kept:
    /// the caller and resource strings are not copied for nobody). Fixed when the request
    /// starts, so it is read without the lock.
    recording: bool,
    data: Arc<ContextCell>,
}

/// A request's notes: the cache outcome in an atomic (every hot-path lookup sets it), the rest
/// under a lock (written at most once or twice per request, and only when recording).
#[derive(Default, Debug)]
struct ContextCell {
    /// [`CACHE_UNKNOWN`], [`CACHE_ALL_HIT`] or [`CACHE_MISSED`].
    cache: AtomicU8,
    notes: Mutex<ContextData>,
}

/// No cache lookup yet.
const CACHE_UNKNOWN: u8 = 0;
/// Every lookup so far hit.
const CACHE_ALL_HIT: u8 = 1;
/// At least one lookup missed.
const CACHE_MISSED: u8 = 2;

/// A request's notes, as its audit record and span read them.
#[derive(Clone, Default, Debug)]
pub struct ContextData {
    /// Object id of the authenticated caller.
    pub principal: Option<String>,
    /// The caller's address (after trusted proxies).
    pub caller_address: Option<SocketAddr>,
    /// The key id, vault, server or database the request names.
    pub resource: Option<String>,
    /// Whether every cache lookup hit (`None`: no cache was consulted).
    pub cache_hit: Option<bool>,
}

tokio::task_local! {
    static CURRENT: RequestContext;
}

impl RequestContext {
    /// A context whose caller and resource notes are kept only when `recording`.
    pub fn new(recording: bool) -> Self {
        RequestContext { recording, data: Arc::default() }
    }

    /// Whether the caller and resource notes are kept (an audit record or a span reads them).
    pub fn recording(&self) -> bool {
        self.recording
    }

    fn with<R>(&self, f: impl FnOnce(&mut ContextData) -> R) -> R {
        f(&mut self.data.notes.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The caller's address (after trusted proxies) and, once authenticated, its object id.
    pub fn note_caller(&self, address: Option<SocketAddr>, principal: Option<&str>) {
        if !self.recording {
            return;
        }
        self.with(|d| {
            d.caller_address = address.or(d.caller_address);
            if let Some(p) = principal {
                d.principal = Some(p.to_string());
            }
        });
    }

    /// The resource the request names (a key id, a vault, a server); never a value or a secret.
    pub fn note_resource(&self, resource: &str) {
        if resource.is_empty() || !self.recording {
            return;
        }
        let mut end = resource.len().min(MAX_RESOURCE);
        while !resource.is_char_boundary(end) {
            end -= 1;
        }
        let r = resource[..end].to_string();
        self.with(|d| d.resource = Some(r));
    }

    /// A cache lookup of this request: `cache_hit` is true when every lookup hit.
    pub fn note_cache(&self, hit: bool) {
        if hit {
            // A miss is never overwritten by a later hit.
            let _ = self.data.cache.compare_exchange(
                CACHE_UNKNOWN,
                CACHE_ALL_HIT,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        } else {
            self.data.cache.store(CACHE_MISSED, Ordering::Relaxed);
        }
    }

    /// The context of the RPC running on this task, if any.
    pub fn current() -> Option<RequestContext> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Runs `fut` (a request's handling) with this context as the task's current one, so cache
    /// lookups anywhere below mark it.
    pub async fn scope<F: Future>(self, fut: F) -> F::Output {
        CURRENT.scope(self, fut).await
    }

    pub(super) fn mark_current_cache(hit: bool) {
        let _ = CURRENT.try_with(|c| c.note_cache(hit));
    }

    /// What the request noted so far.
    pub fn snapshot(&self) -> ContextData {
        let mut data = self.with(|d| d.clone());
        data.cache_hit = match self.data.cache.load(Ordering::Relaxed) {
            CACHE_UNKNOWN => None,
            c => Some(c == CACHE_ALL_HIT),
        };
        data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics;

    #[test]
    fn request_context_keeps_caller_and_resource_only_when_something_records_them() {
        let addr: SocketAddr = "10.1.2.3:4000".parse().unwrap();
        let quiet = RequestContext::new(false);
        quiet.note_caller(Some(addr), Some("oid-1"));
        quiet.note_resource("https://v.vault.azure.net/keys/k");
        quiet.note_cache(true);
        let d = quiet.snapshot();
        assert_eq!((d.principal, d.caller_address, d.resource), (None, None, None));
        assert_eq!(d.cache_hit, Some(true));

        let recorded = RequestContext::new(true);
        recorded.note_caller(Some(addr), Some("oid-1"));
        recorded.note_resource("https://v.vault.azure.net/keys/k");
        recorded.note_cache(true);
        recorded.note_cache(false);
        let d = recorded.snapshot();
        assert_eq!(d.principal.as_deref(), Some("oid-1"));
        assert_eq!(d.caller_address, Some(addr));
        assert_eq!(d.resource.as_deref(), Some("https://v.vault.azure.net/keys/k"));
        assert_eq!(d.cache_hit, Some(false));
    }

    #[tokio::test]
    async fn cache_lookups_mark_the_current_request() {
        let ctx = RequestContext::default();
        CURRENT
            .scope(ctx.clone(), async {
                metrics().cache_hit("test");
                metrics().cache_miss("test");
            })
            .await;
        assert_eq!(ctx.snapshot().cache_hit, Some(false));
        let ctx = RequestContext::default();
        CURRENT.scope(ctx.clone(), async { metrics().cache_hit("test") }).await;
        assert_eq!(ctx.snapshot().cache_hit, Some(true));
    }
}
