//! The channel paths of the REST and SSE surface, `/v1/channels/{channel}/…`, and
//! channel names that contain `/` written as they are (`project:42/canvas`, as in
//! docs/PROTOCOL.md), not only percent-encoded (`project:42%2Fcanvas`).
//!
//! The router matches one path segment per `{channel}`. A request that matches no
//! route and starts with `/v1/channels/` is read again by its last segments:
//!
//! - `…/state/<key>`: the segment before the last is `state`, so the last one is a
//!   state key (a key containing `/` must be percent-encoded) and the channel is
//!   everything before `state`;
//! - `…/events`, `…/history`, `…/state`, `…/presence`: the channel is everything
//!   before the last segment.
//!
//! The rule is checked in that order, so a channel whose own last part is `state`
//! (`a/state`) is only reachable with that slash encoded (`a%2Fstate/history`).
//! Percent-encoding every slash in a channel name always works.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tower_service::Service;

use super::{rest, AppState};

const PREFIX: &str = "/v1/channels/";

/// What may follow a channel name.
const SUFFIXES: &[&str] = &["events", "history", "state", "presence"];

/// The routes under `/v1/channels/{channel}`.
pub fn channel_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/v1/channels/{channel}/events",
            get(rest::events_get).post(rest::publish),
        )
        // Like `/events`: JSON history, or the SSE stream with `Accept: text/event-stream`.
        .route("/v1/channels/{channel}/history", get(rest::events_get))
        .route("/v1/channels/{channel}/state", get(rest::state_all))
        .route(
            "/v1/channels/{channel}/state/{key}",
            get(rest::state_get)
                .put(rest::state_put)
                .delete(rest::state_delete),
        )
        .route("/v1/channels/{channel}/presence", get(rest::presence))
}

/// The same path with the slashes inside the channel name percent-encoded, when it is
/// a channel path whose name has any; `None` otherwise.
pub fn canonical(path: &str) -> Option<String> {
    let rest = path.strip_prefix(PREFIX)?;
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    let name_end = if n >= 3 && segs[n - 2] == "state" {
        n - 2
    } else if n >= 2 && SUFFIXES.contains(&segs[n - 1]) {
        n - 1
    } else {
        return None;
    };
    // One segment: the routes themselves would have matched.
    if name_end < 2 || segs[..name_end].iter().any(|s| s.is_empty()) {
        return None;
    }
    Some(format!(
        "{PREFIX}{}/{}",
        segs[..name_end].join("%2F"),
        segs[name_end..].join("/")
    ))
}

/// The router's fallback: a channel path whose name has slashes goes to
/// `channels` (the routes of [`channel_routes`]) with the slashes encoded; anything
/// else is `not_found`.
pub async fn fallback(mut channels: Router, mut req: Request) -> Response {
    let Some(path) = canonical(req.uri().path()) else {
        return rest::not_found().await.into_response();
    };
    let target = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let Ok(uri) = target.parse::<Uri>() else {
        return rest::not_found().await.into_response();
    };
    *req.uri_mut() = uri;
    // A Router is always ready: `call` needs no `poll_ready` first.
    match channels.call(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::canonical;

    #[test]
    fn names_with_slashes_are_encoded_and_keys_stay_last() {
        let c = |p: &str| canonical(p);
        assert_eq!(
            c("/v1/channels/project:42/canvas/events").as_deref(),
            Some("/v1/channels/project:42%2Fcanvas/events")
        );
        assert_eq!(
            c("/v1/channels/a/b/c/history").as_deref(),
            Some("/v1/channels/a%2Fb%2Fc/history")
        );
        assert_eq!(
            c("/v1/channels/project:42/canvas/state/title").as_deref(),
            Some("/v1/channels/project:42%2Fcanvas/state/title")
        );
        assert_eq!(
            c("/v1/channels/project:42/canvas/state").as_deref(),
            Some("/v1/channels/project:42%2Fcanvas/state")
        );
        // `state/<key>` wins: the key named `history` of channel `a`.
        assert_eq!(c("/v1/channels/a/state/history"), None);
        assert_eq!(
            c("/v1/channels/x/a/state/history").as_deref(),
            Some("/v1/channels/x%2Fa/state/history")
        );
        // Not channel paths, single-segment names, empty parts.
        assert_eq!(c("/v1/channels/a/events"), None);
        assert_eq!(c("/v1/channels/a/b/unknown"), None);
        assert_eq!(c("/v1/other/a/b/events"), None);
        assert_eq!(c("/v1/channels//b/events"), None);
        assert_eq!(c("/v1/channels/a//events"), None);
    }
}
