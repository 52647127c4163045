//! The body timeout: a request's whole body must arrive within [`ListenerOptions::body_timeout`]
//! of the handler starting to read it, or reading fails with [`BodyTimeout`], which
//! [`crate::http::parse`] answers with 408. hyper has no such limit (its header read timeout
//! ends with the head), so a client trickling a body one byte a minute would hold a task and its
//! buffer for ever.
//!
//! [`ListenerOptions::body_timeout`]: super::ListenerOptions::body_timeout

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use tokio::time::Sleep;

/// The body did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimeout(pub Duration);

/// `inner` with a deadline `after` from the first poll.
struct TimeoutBody {
    inner: Body,
    after: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl http_body::Body for TimeoutBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let after = self.after;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(after))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `app` with every request body under a deadline of `after`.
pub fn with_timeout(app: axum::Router, after: Duration) -> axum::Router {
    app.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| async move {
            let (parts, body) = req.into_parts();
            let body = Body::new(TimeoutBody {
                inner: body,
                after,
                deadline: None,
            });
            let r: Response = next.run(Request::from_parts(parts, body)).await;
            r
        },
    ))
}

/// Whether `e`'s chain holds a [`BodyTimeout`].
pub fn is_timeout(e: &(dyn std::error::Error + 'static)) -> Option<Duration> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<BodyTimeout>() {
            return Some(t.0);
        }
        cur = err.source();
    }
    None
}
