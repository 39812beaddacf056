//! The gateway in front of a real model server: every route is forwarded to an
//! OpenAI-compatible upstream (vLLM, llama.cpp's server, Ollama, SGLang, another gateway).
//!
//! [`router`] puts the metered routes (`POST /v1/chat/completions`, `/v1/completions`,
//! `/v1/responses`, `/v1/embeddings` and Anthropic's `/v1/messages`) behind the
//! [`TenantTokenLayer`], and passes `GET /v1/models` and `/v1/models/{id}` through unmetered:
//! listing models costs the upstream no tokens. A path maps onto the base URL as an
//! OpenAI SDK's would: `/v1/chat/completions` goes to `BASE_URL/chat/completions`, so with
//! `http://127.0.0.1:8000/v1` to `/v1/chat/completions` there, and with
//! `http://127.0.0.1:8000` to `/chat/completions`. Query strings are kept.
//!
//! What a request and its response go through:
//!
//! - Bodies stream both ways, buffered nowhere in the proxy: the upstream's frames (a
//!   server-sent event each, as most servers send them) are passed on as they arrive. The
//!   layer alone reads a request's body before it is sent, for its estimate.
//! - Headers that describe one connection rather than the message (`Connection` and the
//!   headers it names, `Keep-Alive`, `TE`, `Transfer-Encoding`, …) are dropped both ways:
//!   each side of the proxy frames its own connection. `Host` becomes the upstream's.
//! - With an upstream key, the upstream gets `Authorization: Bearer KEY` and never the
//!   client's `Authorization` or `x-api-key`: clients hold gateway credentials, not the
//!   upstream's. Without one, the client's headers pass as they came.
//! - `Accept-Encoding: identity` is asked for: the layer reads the usage the upstream
//!   reports only in bodies that are not compressed.
//! - The upstream's `x-ratelimit-*` headers are dropped: they describe the gateway's own
//!   account with the upstream, while the tenant's headers (its cap, what is left) are the
//!   layer's. `Retry-After` passes, so an upstream's own 429 is retried as usual.
//! - Every other header passes, `x-tenant-id` included: it is harmless to a model server,
//!   lets one log per tenant, and lets a second gateway upstream meter the same tenants.
//!   Remove it in [`Proxy::forward`] if tenant names must not leave the gateway.
//!
//! An upstream that cannot be reached gets 502 (`upstream_unreachable`), one that has not
//! sent its response head within the timeout 504 (`upstream_timeout`), both as
//! OpenAI-style JSON errors. The timeout stops at the head: a stream may run longer. Either
//! way the handler returns, and a client that goes away drops the response: the tenant's
//! reservation is released on every path.
//!
//! The connections are pooled. Over plain `http`, HTTP/2 is prior knowledge only (there
//! is no TLS to negotiate it in), so the default is HTTP/1.1; pass `http2: true` for an
//! upstream that speaks HTTP/2 in the clear (vLLM and most servers do not). An `https`
//! base URL is refused: it needs a TLS connector (`hyper-rustls` or `hyper-tls`) in place
//! of the plain `HttpConnector`, left out here to keep the example's dependencies small.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::uri::{Authority, PathAndQuery, Scheme, Uri};
use axum::http::{StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tower_tenant_tokens::TenantTokenLayer;

/// The gateway's routes, forwarded to `proxy`'s upstream; the metered ones behind `limits`.
pub fn router(proxy: Proxy, limits: TenantTokenLayer) -> Router {
    // Chat Completions and Completions accept `stream_options.include_usage`, which the
    // layer may add to a stream that did not ask for its usage. The Responses and Messages
    // APIs refuse that field, so their routes get the same layer (the same tracker, queue
    // and learned estimates) without the asking.
    let chat = Router::new()
        .route("/v1/chat/completions", post(forward))
        .route("/v1/completions", post(forward))
        .route_layer(limits.clone());
    let others = Router::new()
        .route("/v1/responses", post(forward))
        .route("/v1/embeddings", post(forward))
        .route("/v1/messages", post(forward))
        .route_layer(limits.ask_stream_usage(false));
    chat.merge(others)
        .route("/v1/models", get(forward))
        .route("/v1/models/{*id}", get(forward)) // ids may hold `/`: org/model
        .with_state(Arc::new(proxy))
}

async fn forward(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    proxy.forward(request).await
}

/// Where requests go, and the client that takes them there.
pub struct Proxy {
    client: Client<HttpConnector, Body>,
    authority: Authority,
    /// The base URL's path without its last `/`: `/v1`, or empty.
    prefix: String,
    /// `Bearer KEY`, sent in place of the client's credentials.
    authorization: Option<HeaderValue>,
    timeout: Duration,
}

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

impl Proxy {
    /// A proxy to `base_url` (`http://host:port/prefix`), sending `Authorization: Bearer
    /// api_key` if given, waiting `timeout` for each response head, over HTTP/2 (prior
    /// knowledge) if `http2`, else HTTP/1.1.
    pub fn new(
        base_url: &str,
        api_key: Option<&str>,
        timeout: Duration,
        http2: bool,
    ) -> Result<Self, String> {
        let base: Uri = base_url
            .parse()
            .map_err(|error| format!("{base_url}: {error}"))?;
        match base.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "{base_url}: https needs a TLS connector, which this example leaves out \
                     (see examples/gateway/proxy.rs); use an http:// upstream"
                ))
            }
            _ => return Err(format!("{base_url}: expected http://host:port[/path]")),
        }
        let authority = match (base.authority(), base.query()) {
            (Some(authority), None) => authority.clone(),
            _ => return Err(format!("{base_url}: expected http://host:port[/path]")),
        };
        let authorization = match api_key {
            Some(key) => {
                let mut value = HeaderValue::try_from(format!("Bearer {key}"))
                    .map_err(|_| "the upstream key is not a valid header value".to_owned())?;
                value.set_sensitive(true); // kept out of debug output
                Some(value)
            }
            None => None,
        };
        // A stream's events are small writes: sent at once, not held for the peer's ack.
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(http2)
            .build(connector);
        Ok(Self {
            client,
            authority,
            prefix: base.path().trim_end_matches('/').to_owned(),
            authorization,
            timeout,
        })
    }

    /// Sends `request` upstream and returns the response as it starts (its body streams).
    pub async fn forward(&self, request: Request) -> Response {
        let (mut head, body) = request.into_parts();
        let path = head.uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let path = path.strip_prefix("/v1").unwrap_or(path);
        head.uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(format!("{}{path}", self.prefix))
            .build()
            .expect("a valid path after a valid path is a valid path");
        // The client speaks HTTP/2 by itself on an HTTP/2 connection; it refuses a request
        // marked HTTP/2 (a client's, say) on an HTTP/1.1 one.
        head.version = Version::HTTP_11;
        drop_hop_by_hop(&mut head.headers);
        head.headers.remove(header::HOST); // the client writes the upstream's, from the URI
        head.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        if let Some(authorization) = &self.authorization {
            head.headers.remove(X_API_KEY);
            head.headers
                .insert(header::AUTHORIZATION, authorization.clone());
        }

        let sent = self.client.request(Request::from_parts(head, body));
        let response = match tokio::time::timeout(self.timeout, sent).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) if error.is_connect() => {
                tracing::warn!("upstream unreachable: {error:?}");
                let message = "the upstream model server cannot be reached";
                return failure(StatusCode::BAD_GATEWAY, "upstream_unreachable", message);
            }
            Ok(Err(error)) => {
                tracing::warn!("upstream failed: {error:?}");
                let message = "the upstream model server failed before answering";
                return failure(StatusCode::BAD_GATEWAY, "upstream_error", message);
            }
            Err(_) => {
                let message = format!(
                    "the upstream model server did not answer within {:?}",
                    self.timeout
                );
                return failure(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", &message);
            }
        };
        let (mut head, body) = response.into_parts();
        drop_hop_by_hop(&mut head.headers);
        let upstream_limits: Vec<HeaderName> = head
            .headers
            .keys()
            .filter(|name| name.as_str().starts_with("x-ratelimit-"))
            .cloned()
            .collect();
        for name in upstream_limits {
            head.headers.remove(name);
        }
        Response::from_parts(head, Body::new(body))
    }
}

/// Drops the headers that belong to one connection, not to the message (RFC 9110, 7.6.1):
/// those `Connection` names, and the usual ones whether it names them or not.
fn drop_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
}

/// An OpenAI-style error, as the SDKs parse it.
fn failure(status: StatusCode, code: &str, message: &str) -> Response {
    let error = json!({"message": message, "type": "server_error", "param": null, "code": code});
    (status, Json(json!({ "error": error }))).into_response()
}
