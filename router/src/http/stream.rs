//! Server-sent events: a task turns scheduler events into `data: {json}` chunks and ends with
//! `data: [DONE]`. When the client disconnects the SSE body is dropped; the task notices at once
//! (it waits on the channel's closure too) and drops the scheduler's receiver, which cancels the
//! sequence at the next engine step. Before answering 200 a stream waits briefly
//! ([`FIRST_EVENT_WAIT`]) for its first event, so a request that fails at once (no replica of an
//! expert it needs) gets its real status and error body rather than a 200 and an in-band error.
//! One that fails later (an in-band error, or the engine gone without a last event) ends with an
//! error chunk, and is counted by its error type, not as a 200.

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::scheduler::Event;

/// How long a stream waits for its first event before committing to 200.
pub const FIRST_EVENT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The first event of `events` if it comes within `within`; a failure is returned as the error.
pub async fn first_event(
    mut events: mpsc::UnboundedReceiver<Event>,
    within: std::time::Duration,
) -> Result<(Option<Event>, mpsc::UnboundedReceiver<Event>), crate::error::ApiError> {
    match tokio::time::timeout(within, events.recv()).await {
        Ok(Some(Event::Failed(e))) => Err(e),
        Ok(Some(ev)) => Ok((Some(ev), events)),
        Ok(None) => Err(crate::error::ApiError::Unavailable(
            "the engine stopped before the request started".into(),
        )),
        Err(_) => Ok((None, events)),
    }
}

/// Turns `first` (an event already received) and then `events` into an SSE response, each event rendered by `render` into zero or more JSON
/// chunks (a final `None` from `render` at the end adds trailing chunks, e.g. usage).
pub fn sse(
    first: Option<Event>,
    mut events: mpsc::UnboundedReceiver<Event>,
    mut render: impl FnMut(Option<&Event>) -> Vec<serde_json::Value> + Send + 'static,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let mut first = first;
        loop {
            let ev = match first.take() {
                Some(ev) => Some(ev),
                None => tokio::select! {
                    ev = events.recv() => ev,
                    _ = tx.closed() => return, // client gone: dropping `events` cancels the sequence
                },
            };
            // The engine went away without ending the sequence (a panic): the stream fails
            // rather than ending as if complete.
            let ev = ev.unwrap_or_else(|| {
                Event::Failed(crate::error::ApiError::Unavailable(
                    "the engine stopped before the request finished".into(),
                ))
            });
            let end = matches!(ev, Event::Finished { .. } | Event::Failed(_));
            for chunk in render(Some(&ev)) {
                if tx
                    .send(Ok(SseEvent::default().data(chunk.to_string())))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if end {
                break;
            }
        }
        for chunk in render(None) {
            if tx
                .send(Ok(SseEvent::default().data(chunk.to_string())))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}
