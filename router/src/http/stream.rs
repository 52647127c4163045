//! Server-sent events: a task turns scheduler events into `data: {json}` chunks and ends with
//! `data: [DONE]`. When the client disconnects the SSE body is dropped; the task notices at once
//! (it waits on the channel's closure too) and drops the scheduler's receiver, which cancels the
//! sequence at the next engine step.

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::scheduler::Event;

/// Turns `events` into an SSE response, each event rendered by `render` into zero or more JSON
/// chunks (a final `None` from `render` at the end adds trailing chunks, e.g. usage).
pub fn sse(
    mut events: mpsc::UnboundedReceiver<Event>,
    mut render: impl FnMut(Option<&Event>) -> Vec<serde_json::Value> + Send + 'static,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = tx.closed() => return, // client gone: dropping `events` cancels the sequence
            };
            let Some(ev) = ev else { break };
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
