//! A [`tower::Layer`] that puts the guard in front of an HTTP client (hyper, tonic): every
//! request is judged before it leaves, with the URI path as the RPC name and the URI authority
//! (or the `Host` header) as the backend.
//!
//! * allowed: the request goes through;
//! * would-reject (audit): the request goes through; it is counted and logged;
//! * rejected (enforce): the request never leaves. A gRPC request (`content-type:
//!   application/grpc…`) gets a trailers-only response with `grpc-status: 7`
//!   (`PERMISSION_DENIED`) and a `grpc-message` that says why, so gRPC clients see an ordinary
//!   status; any other request fails with [`CallError::Denied`].
//!
//! Every call is counted in `depfence_rpc_calls_total{service,backend,verdict}`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use pin_project_lite::pin_project;

use super::{Decision, Guard, LoadError, Reason};
use crate::verdict::Verdict;

/// The gRPC status code `PERMISSION_DENIED`.
pub const GRPC_PERMISSION_DENIED: u16 = 7;

/// Characters a `grpc-message` must percent-encode (besides non-ASCII): controls and `%`.
const GRPC_MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

/// Wraps a client service in a [`GuardService`] that judges its calls as `service`.
#[derive(Debug, Clone)]
pub struct GuardLayer {
    guard: Guard,
    service: Arc<str>,
}

impl GuardLayer {
    /// A layer judging calls as the policy's `service`; fails when the snapshot in force has
    /// no such service.
    pub fn new(guard: Guard, service: &str) -> Result<GuardLayer, LoadError> {
        if !guard.has_service(service) {
            return Err(LoadError::UnknownService { service: service.to_owned() });
        }
        Ok(GuardLayer { guard, service: Arc::from(service) })
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = GuardService<S>;

    fn layer(&self, inner: S) -> GuardService<S> {
        GuardService { inner, guard: self.guard.clone(), service: Arc::clone(&self.service) }
    }
}

/// The service [`GuardLayer`] makes.
#[derive(Debug, Clone)]
pub struct GuardService<S> {
    inner: S,
    guard: Guard,
    service: Arc<str>,
}

/// A call the guard refused (enforce, non-gRPC request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcDenied {
    service: String,
    rpc: String,
    authority: String,
    backend: Option<String>,
    environment: String,
    position: Option<String>,
}

impl RpcDenied {
    fn new(decision: &Decision, service: &str, rpc: &str, authority: &str, environment: &str) -> RpcDenied {
        RpcDenied {
            service: service.to_owned(),
            rpc: rpc.to_owned(),
            authority: authority.to_owned(),
            backend: decision.backend().map(str::to_owned),
            environment: environment.to_owned(),
            position: decision.caller_position().filter(|p| !p.is_empty()),
        }
    }

    /// The calling service.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The RPC name (request path).
    pub fn rpc(&self) -> &str {
        &self.rpc
    }

    /// The authority the call was for.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The backend service the authority names, if any.
    pub fn backend(&self) -> Option<&str> {
        self.backend.as_deref()
    }

    /// Where the calling service is defined in the policy (`file:line:col`), if known.
    pub fn position(&self) -> Option<&str> {
        self.position.as_deref()
    }
}

impl fmt::Display for RpcDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "depfence rejected rpc `{}` from `{}` to `{}`", self.rpc, self.service, self.authority)?;
        match &self.backend {
            Some(backend) => write!(
                f,
                " (service `{backend}`): no `rpc_allow` pattern of `{}` for `{backend}` matches",
                self.service
            )?,
            None => f.write_str(": the authority is no endpoint or name of a service of the policy")?,
        }
        write!(f, " (environment `{}`, enforce", self.environment)?;
        if let Some(position) = &self.position {
            write!(f, "; `{}` is defined at {position}", self.service)?;
        }
        f.write_str(")")
    }
}

impl std::error::Error for RpcDenied {}

/// The error of a [`GuardService`]: the guard refused the call, or the inner service failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError<E> {
    /// The guard refused the call (enforce, non-gRPC request).
    #[error(transparent)]
    Denied(Box<RpcDenied>),
    /// The wrapped service failed.
    #[error(transparent)]
    Inner(E),
}

pin_project! {
    /// The response body of a [`GuardService`]: the backend's body, or nothing for a call the
    /// guard answered itself.
    #[derive(Debug)]
    pub struct GuardBody<B> {
        #[pin]
        inner: Option<B>,
    }
}

impl<B> GuardBody<B> {
    fn denied() -> Self {
        GuardBody { inner: None }
    }

    fn new(body: B) -> Self {
        GuardBody { inner: Some(body) }
    }

    /// The backend's body; None when the guard answered the call itself.
    pub fn into_inner(self) -> Option<B> {
        self.inner
    }

    /// True when the guard answered the call itself (a rejected gRPC call).
    pub fn is_denied(&self) -> bool {
        self.inner.is_none()
    }
}

impl<B: Body> Body for GuardBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        match self.project().inner.as_pin_mut() {
            Some(body) => body.poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

type Answer<B, E> = Result<Response<GuardBody<B>>, CallError<E>>;

pin_project! {
    /// The future of a [`GuardService`] call.
    #[derive(Debug)]
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        state: State<F, B, E>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F, B, E> {
        // The call went through.
        Inner { #[pin] future: F },
        // The guard answered (taken on the first poll).
        Ready { answer: Option<Answer<B, E>> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    fn inner(future: F) -> Self {
        ResponseFuture { state: State::Inner { future } }
    }

    fn ready(answer: Answer<B, E>) -> Self {
        ResponseFuture { state: State::Ready { answer: Some(answer) } }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Answer<B, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Inner { future } => {
                future.poll(cx).map(|result| result.map(|r| r.map(GuardBody::new)).map_err(CallError::Inner))
            }
            // Polled again after completion: never ready again.
            StateProj::Ready { answer } => answer.take().map_or(Poll::Pending, Poll::Ready),
        }
    }
}

fn is_grpc<B>(request: &Request<B>) -> bool {
    request.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A trailers-only gRPC response with `PERMISSION_DENIED`.
fn grpc_denied<B>(message: &str) -> Response<GuardBody<B>> {
    let mut response = Response::new(GuardBody::denied());
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from(GRPC_PERMISSION_DENIED));
    let encoded = utf8_percent_encode(message, GRPC_MESSAGE).to_string();
    if let Ok(value) = HeaderValue::from_str(&encoded) {
        headers.insert("grpc-message", value);
    }
    response
}

impl<S, ReqB, ResB> tower::Service<Request<ReqB>> for GuardService<S>
where
    S: tower::Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<GuardBody<ResB>>;
    type Error = CallError<S::Error>;
    type Future = ResponseFuture<S::Future, ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(CallError::Inner)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        let authority = match request.uri().authority() {
            Some(authority) => authority.as_str(),
            None => request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or(""),
        };
        let rpc = request.uri().path();
        let decision = self.guard.check(&self.service, rpc, authority);
        decision.record(&self.service);
        match decision.verdict {
            // The guard judges against one snapshot: it has no candidate to shadow.
            Verdict::Allowed | Verdict::CandidateWouldReject => {}
            Verdict::WouldReject => {
                tracing::warn!(
                    service = %self.service,
                    rpc,
                    authority,
                    backend = decision.backend().unwrap_or(super::metrics::UNKNOWN_BACKEND),
                    verdict = decision.verdict.as_str(),
                    "depfence guard: call not allowed by the policy (audit: passed through)"
                );
            }
            Verdict::Rejected => {
                let denied = RpcDenied::new(&decision, &self.service, rpc, authority, self.guard.environment());
                tracing::warn!(
                    service = %self.service,
                    rpc,
                    authority,
                    backend = decision.backend().unwrap_or(super::metrics::UNKNOWN_BACKEND),
                    verdict = decision.verdict.as_str(),
                    unknown_backend = matches!(decision.reason, Reason::UnknownBackend { .. }),
                    "depfence guard: call rejected"
                );
                let answer = if is_grpc(&request) {
                    Ok(grpc_denied(&denied.to_string()))
                } else {
                    Err(CallError::Denied(Box::new(denied)))
                };
                return ResponseFuture::ready(answer);
            }
        }
        drop(decision);
        ResponseFuture::inner(self.inner.call(request))
    }
}
