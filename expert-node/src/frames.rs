//! Reserving as bytes arrive: a request-body wrapper in front of tonic that holds each gRPC
//! message's chunks (zero-copy `Bytes`, as they come off the HTTP/2 stream) and hands the
//! message to tonic only once all of it is here. tonic reserves a message's *declared* length
//! as soon as its 5-byte header arrives; behind this wrapper the header arrives together with
//! the body, so a stalled declaration holds only the bytes its sender really sent, never the
//! size it claimed. (Reading a chunk returns its HTTP/2 flow-control window, so a sender that
//! keeps sending can bring a held message up to its declared size, which is at most `max`: that
//! is memory for bytes that really arrived.) A declaration over
//! `--max-message-bytes` is passed through at once, for tonic to refuse from the header.
//! Framing: <https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md> (Length-Prefixed-Message).

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::body::Body as TonicBody;

const HEADER: usize = 5;

/// A request body whose messages reach the consumer whole (see the module header).
pub struct WholeMessages<B> {
    inner: B,
    max: usize,
    /// Chunks of the message not yet complete, and their total length.
    held: VecDeque<Bytes>,
    held_len: usize,
    /// Chunks of complete messages, to hand on.
    ready: VecDeque<Bytes>,
    /// A trailers frame (or end) seen while chunks were still to hand on.
    trailers: Option<Frame<Bytes>>,
    /// Past a refused declaration: everything is forwarded as it comes.
    passthrough: bool,
}

impl<B> WholeMessages<B> {
    /// Wraps `inner`; messages declaring more than `max` bytes are forwarded unheld.
    pub fn new(inner: B, max: usize) -> Self {
        WholeMessages {
            inner,
            max,
            held: VecDeque::new(),
            held_len: 0,
            ready: VecDeque::new(),
            trailers: None,
            passthrough: false,
        }
    }

    /// Bytes received and held back (a message not yet complete).
    pub fn held_bytes(&self) -> usize {
        self.held_len
    }

    fn header(&self) -> Option<usize> {
        if self.held_len < HEADER {
            return None;
        }
        let mut h = [0u8; HEADER];
        let mut i = 0;
        'outer: for c in &self.held {
            for &b in c.iter() {
                h[i] = b;
                i += 1;
                if i == HEADER {
                    break 'outer;
                }
            }
        }
        Some(u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize)
    }

    /// Moves every complete message from `held` to `ready`.
    fn release_complete(&mut self) {
        while let Some(len) = self.header() {
            if len > self.max {
                self.passthrough = true;
                self.ready.extend(self.held.drain(..));
                self.held_len = 0;
                return;
            }
            let mut need = HEADER + len;
            if self.held_len < need {
                return;
            }
            self.held_len -= need;
            while need > 0 {
                let Some(mut c) = self.held.pop_front() else {
                    return;
                };
                if c.len() > need {
                    self.ready.push_back(c.split_to(need));
                    self.held.push_front(c);
                    need = 0;
                } else {
                    need -= c.len();
                    self.ready.push_back(c);
                }
            }
        }
    }
}

impl<B> Body for WholeMessages<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(c) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(c))));
            }
            if let Some(t) = this.trailers.take() {
                return Poll::Ready(Some(Ok(t)));
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if this.passthrough => {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(data) => {
                        if !data.is_empty() {
                            this.held_len += data.len();
                            this.held.push_back(data);
                            this.release_complete();
                        }
                    }
                    Err(other) => {
                        // The end of the body: what is held is an incomplete message, which
                        // tonic reports as such.
                        this.ready.extend(this.held.drain(..));
                        this.held_len = 0;
                        this.trailers = Some(other);
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    if this.held.is_empty() {
                        return Poll::Ready(None);
                    }
                    this.ready.extend(this.held.drain(..));
                    this.held_len = 0;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_empty()
            && self.held.is_empty()
            && self.trailers.is_none()
            && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A tower layer that wraps every request body in [`WholeMessages`].
#[derive(Debug, Clone, Copy)]
pub struct WholeMessagesLayer {
    /// The largest message held back; larger declarations pass through to be refused.
    pub max: usize,
}

impl<S> tower_layer::Layer<S> for WholeMessagesLayer {
    type Service = WholeMessagesService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        WholeMessagesService {
            inner,
            max: self.max,
        }
    }
}

/// The service [`WholeMessagesLayer`] makes.
#[derive(Debug, Clone)]
pub struct WholeMessagesService<S> {
    inner: S,
    max: usize,
}

impl<S> tower_service::Service<http::Request<TonicBody>> for WholeMessagesService<S>
where
    S: tower_service::Service<http::Request<TonicBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<TonicBody>) -> Self::Future {
        let max = self.max;
        self.inner
            .call(req.map(|b| TonicBody::new(WholeMessages::new(b, max))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn msg(len: usize, fill: u8) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&(len as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(fill, len));
        m
    }

    /// Messages split at every awkward place come out whole, in order, byte for byte.
    #[tokio::test]
    async fn messages_come_out_whole_whatever_the_chunking() {
        let mut wire = msg(10, 1);
        wire.extend(msg(0, 0));
        wire.extend(msg(300, 2));
        for step in [1usize, 3, 5, 7, 64, 1000] {
            let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = wire
                .chunks(step)
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            let inner = http_body_util::StreamBody::new(futures::stream::iter(chunks));
            let mut body = WholeMessages::new(inner, 1 << 20);
            let mut got = Vec::new();
            let mut boundaries = Vec::new();
            while let Some(f) = body.frame().await {
                let d = f.expect("frame").into_data().expect("data");
                got.extend_from_slice(&d);
                boundaries.push(got.len());
            }
            assert_eq!(got, wire, "step {step}");
            // Every message's last byte ends a chunk handed on: nothing of a message is handed
            // on before all of it has arrived.
            for end in [15usize, 20, 325] {
                assert!(boundaries.contains(&end), "step {step}: {boundaries:?}");
            }
        }
    }

    /// A stalled declaration holds only what arrived.
    #[tokio::test]
    async fn a_partial_message_is_held_not_reserved() {
        let mut wire = msg(100 << 20, 0);
        wire.truncate(HEADER + 1000);
        let (mut tx, rx) =
            futures::channel::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
        tx.try_send(Ok(Frame::data(Bytes::from(wire))))
            .expect("send");
        let mut body = WholeMessages::new(http_body_util::StreamBody::new(rx), 200 << 20);
        let polled = futures::poll!(body.frame());
        assert!(polled.is_pending());
        assert_eq!(body.held_bytes(), HEADER + 1000);
    }
}
