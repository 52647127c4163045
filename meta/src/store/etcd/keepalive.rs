//! Lease keep-alive over one long-lived stream per lease (etcd's `LeaseKeepAlive` RPC is
//! bidirectional: send the lease id, read its new TTL).
//!
//! Each refresh sends on the lease's open stream and waits for the answer with a deadline
//! ([`super::members::ATTEMPT_TIMEOUT`]). A stream that breaks, or an answer that does not come
//! in time, marks its member down, and the refresh opens a new stream on the next member at
//! once. An answer with TTL 0 is etcd's way of saying the lease does not exist: that, and only
//! that, is [`StoreError::LeaseGone`]. Nothing here reads error text.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};

use super::super::{LeaseId, Result, StoreError};
use super::members::{ATTEMPT_TIMEOUT, Failure, Members, classify};

/// An open keep-alive stream: its member, and both halves.
struct Open {
    member: usize,
    keeper: LeaseKeeper,
    answers: LeaseKeepAliveStream,
}

/// The open streams of a store's leases.
#[derive(Default)]
pub struct KeepAlives {
    streams: Mutex<HashMap<LeaseId, Arc<tokio::sync::Mutex<Option<Open>>>>>,
}

enum Refresh {
    Alive,
    Gone,
    MemberFailed(String),
}

impl KeepAlives {
    fn slot(&self, lease: LeaseId) -> Arc<tokio::sync::Mutex<Option<Open>>> {
        let mut m = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(lease).or_default().clone()
    }

    /// Forgets a lease's stream (after a revoke or once the lease is gone).
    pub fn forget(&self, lease: LeaseId) {
        let mut m = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&lease);
    }

    /// Refreshes `lease` once: on its open stream when its member is healthy, else (or when
    /// that fails) on a new stream, member by member.
    pub async fn refresh(&self, members: &Members, lease: LeaseId) -> Result<()> {
        let slot = self.slot(lease);
        let mut open = slot.lock().await;
        if let Some(o) = open.as_mut()
            && members.is_healthy(o.member)
        {
            match refresh_on(o).await {
                Refresh::Alive => return Ok(()),
                Refresh::Gone => {
                    *open = None;
                    drop(open);
                    self.forget(lease);
                    return Err(StoreError::LeaseGone(lease));
                }
                Refresh::MemberFailed(why) => members.mark_down(o.member, &why),
            }
        }
        *open = None;
        let mut last = String::from("no member tried");
        for i in members.order() {
            let mut c = members.list[i].client.clone();
            // Opening the stream sends the first refresh and reads its answer.
            match tokio::time::timeout(ATTEMPT_TIMEOUT, c.lease_keep_alive(lease)).await {
                Ok(Ok((keeper, answers))) => {
                    members.mark_up(i);
                    *open = Some(Open {
                        member: i,
                        keeper,
                        answers,
                    });
                    return Ok(());
                }
                // etcd-client answers a first response with TTL 0 (no such lease) with this
                // variant; it is the protocol's answer, not a transport failure.
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => {
                    drop(open);
                    self.forget(lease);
                    return Err(StoreError::LeaseGone(lease));
                }
                Ok(Err(e)) => match classify(e) {
                    Failure::Member(why) => {
                        members.mark_down(i, &why);
                        last = why;
                    }
                    Failure::Answer(e) if is_not_found(&e) => {
                        drop(open);
                        self.forget(lease);
                        return Err(StoreError::LeaseGone(lease));
                    }
                    Failure::Answer(e) => return Err(StoreError::Unavailable(e.to_string())),
                },
                Err(_) => {
                    let why = format!("keep-alive stream not open within {ATTEMPT_TIMEOUT:?}");
                    members.mark_down(i, &why);
                    last = why;
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "cannot refresh lease {lease} on any etcd member (last: {last})"
        )))
    }
}

/// One refresh on an open stream.
async fn refresh_on(o: &mut Open) -> Refresh {
    if let Err(e) = o.keeper.keep_alive().await {
        return Refresh::MemberFailed(format!("keep-alive stream closed: {e}"));
    }
    match tokio::time::timeout(ATTEMPT_TIMEOUT, o.answers.message()).await {
        Ok(Ok(Some(r))) if r.ttl() > 0 => Refresh::Alive,
        Ok(Ok(Some(_))) => Refresh::Gone,
        Ok(Ok(None)) => Refresh::MemberFailed("keep-alive stream ended".into()),
        Ok(Err(e)) => match classify(e) {
            Failure::Answer(e) if is_not_found(&e) => Refresh::Gone,
            Failure::Answer(e) => Refresh::MemberFailed(e.to_string()),
            Failure::Member(why) => Refresh::MemberFailed(why),
        },
        Err(_) => Refresh::MemberFailed(format!("no keep-alive answer within {ATTEMPT_TIMEOUT:?}")),
    }
}

/// gRPC `NotFound` (etcd's `ErrGRPCLeaseNotFound`).
pub fn is_not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::NotFound)
}
