//! The etcd implementation (etcd v3 API through `etcd-client`), built to survive any minority of
//! members down, frozen or partitioned.
//!
//! One client per member ([`members`]): unary requests go to the preferred healthy member and
//! move on to the next one when a member fails (transport codes, `no leader`, or no answer
//! within [`members::ATTEMPT_TIMEOUT`]); watches are opened the same way and end with an error
//! as soon as their member is marked down, so the caller's re-list lands on a healthy one;
//! lease refreshes use one long-lived stream per lease ([`keepalive`]). Every request carries
//! `require_leader`. A missing lease is recognised by its gRPC code (`NotFound`) or by a
//! keep-alive answer with TTL 0, never by error text. TLS and etcd users: [`auth`].
//!
//! API reference: <https://etcd.io/docs/v3.4/learning/api/>.

pub mod auth;
mod keepalive;
pub mod members;

pub use auth::EtcdAuth;

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Compare as ECompare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use futures::StreamExt;
use futures::stream::BoxStream;

use self::keepalive::{KeepAlives, is_not_found};
use self::members::{ATTEMPT_TIMEOUT, Failure, Members, classify};
use super::*;
use crate::telemetry::store_metrics::observe;

/// Largest list or watch answer decoded (gRPC's default is 4 MiB). The largest legitimate list
/// at fleet size is the coordinator's `load/` prefix, ~4.1 MiB for 64 routers at 384 experts
/// (`moe simulate`); 64 MiB leaves room for 15× that while still refusing a runaway answer.
pub const MAX_DECODE_BYTES: usize = 64 << 20;

/// A store on an etcd cluster (cheap to clone; clones share channels and member health).
#[derive(Clone)]
pub struct EtcdStore {
    members: Arc<Members>,
    keepalives: Arc<KeepAlives>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<&str> = self.members.list.iter().map(|m| m.url.as_str()).collect();
        f.debug_struct("EtcdStore").field("members", &urls).finish()
    }
}

/// A failure of a request that involves no lease.
fn plain(f: Failure) -> StoreError {
    match f {
        Failure::Member(why) => StoreError::Unavailable(why),
        Failure::Answer(e) => StoreError::Unavailable(e.to_string()),
    }
}

/// A failure of a request on `lease`: gRPC `NotFound` means the lease is gone.
fn leased(f: Failure, lease: LeaseId) -> StoreError {
    match f {
        Failure::Answer(e) if is_not_found(&e) => StoreError::LeaseGone(lease),
        other => plain(other),
    }
}

fn kv(k: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(k.key()).into_owned(),
        value: k.value().to_vec(),
        mod_revision: k.mod_revision(),
        lease: k.lease(),
    }
}

/// Whole seconds, rounded up, as etcd grants them (at least 1).
pub fn ttl_secs(ttl: Duration) -> i64 {
    (ttl.as_millis().div_ceil(1000) as i64).max(1)
}

impl EtcdStore {
    /// Connects to the comma-separated endpoints (`http://127.0.0.1:2379,...`). Nothing is
    /// dialled yet: a member that is down now is simply tried later.
    pub async fn connect(endpoints: &str) -> Result<EtcdStore> {
        EtcdStore::connect_with(endpoints, &EtcdAuth::default()).await
    }

    /// [`EtcdStore::connect`] with TLS and/or an etcd user.
    pub async fn connect_with(endpoints: &str, auth: &EtcdAuth) -> Result<EtcdStore> {
        let eps: Vec<&str> = endpoints
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        let members = Arc::new(Members::connect(&eps, auth).await?);
        tokio::spawn(Members::probe_forever(Arc::downgrade(&members)));
        Ok(EtcdStore {
            members,
            keepalives: Arc::default(),
        })
    }

    /// Connects and checks that some member answers (a bad endpoint fails here, clearly).
    pub async fn connect_checked(endpoints: &str, auth: &EtcdAuth) -> Result<EtcdStore> {
        let s = EtcdStore::connect_with(endpoints, auth).await?;
        s.get("/moe-health").await?;
        Ok(s)
    }

    /// Index (in the endpoint list) of the member requests go to first now.
    pub fn preferred(&self) -> usize {
        self.members.order()[0]
    }

    /// The member URLs and whether each is healthy now.
    pub fn health(&self) -> Vec<(String, bool)> {
        (0..self.members.list.len())
            .map(|i| (self.members.list[i].url.clone(), self.members.is_healthy(i)))
            .collect()
    }
}

impl MetaStore for EtcdStore {
    fn get(&self, key: &str) -> BoxFut<'_, Result<Option<KeyValue>>> {
        let key = key.to_string();
        Box::pin(observe("get", async move {
            let (_, r) = self
                .members
                .call(|mut c| {
                    let key = key.clone();
                    async move { c.get(key, None).await }
                })
                .await
                .map_err(plain)?;
            Ok(r.kvs().first().map(kv))
        }))
    }

    fn list(&self, prefix: &str) -> BoxFut<'_, Result<(Vec<KeyValue>, i64)>> {
        let prefix = prefix.to_string();
        Box::pin(observe("list", async move {
            let (_, r) = self
                .members
                .call(|c| {
                    let prefix = prefix.clone();
                    async move {
                        c.kv_client()
                            .max_decoding_message_size(MAX_DECODE_BYTES)
                            .get(prefix, Some(GetOptions::new().with_prefix()))
                            .await
                    }
                })
                .await
                .map_err(plain)?;
            let rev = r.header().map_or(0, |h| h.revision());
            Ok((r.kvs().iter().map(kv).collect(), rev))
        }))
    }

    fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> BoxFut<'_, Result<i64>> {
        let key = key.to_string();
        Box::pin(observe("put", async move {
            let (_, r) = self
                .members
                .call(|mut c| {
                    let (key, value) = (key.clone(), value.clone());
                    let opts = lease.map(|l| PutOptions::new().with_lease(l));
                    async move { c.put(key, value, opts).await }
                })
                .await
                .map_err(|f| match lease {
                    Some(l) => leased(f, l),
                    None => plain(f),
                })?;
            Ok(r.header().map_or(0, |h| h.revision()))
        }))
    }

    fn delete(&self, key: &str) -> BoxFut<'_, Result<()>> {
        let key = key.to_string();
        Box::pin(observe("delete", async move {
            self.members
                .call(|mut c| {
                    let key = key.clone();
                    async move { c.delete(key, None).await }
                })
                .await
                .map_err(plain)?;
            Ok(())
        }))
    }

    fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> BoxFut<'_, Result<bool>> {
        Box::pin(observe("txn", async move {
            let when: Vec<ECompare> = compares
                .into_iter()
                .map(|cmp| match cmp {
                    Compare::Absent(k) => ECompare::create_revision(k, CompareOp::Equal, 0),
                    Compare::Value(k, v) => ECompare::value(k, CompareOp::Equal, v),
                    Compare::ModRevision(k, r) => ECompare::mod_revision(k, CompareOp::Equal, r),
                })
                .collect();
            let lease = ops.iter().find_map(|o| match o {
                Op::Put { lease: Some(l), .. } => Some(*l),
                _ => None,
            });
            let then: Vec<TxnOp> = ops
                .into_iter()
                .map(|op| match op {
                    Op::Put { key, value, lease } => {
                        TxnOp::put(key, value, lease.map(|l| PutOptions::new().with_lease(l)))
                    }
                    Op::Delete(key) => TxnOp::delete(key, None),
                })
                .collect();
            let txn = Txn::new().when(when).and_then(then);
            let (_, r) = self
                .members
                .call(|mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await
                .map_err(|f| match lease {
                    Some(l) => leased(f, l),
                    None => plain(f),
                })?;
            Ok(r.succeeded())
        }))
    }

    fn grant(&self, ttl: Duration) -> BoxFut<'_, Result<LeaseId>> {
        Box::pin(observe("grant", async move {
            let (_, r) = self
                .members
                .call(|mut c| async move { c.lease_grant(ttl_secs(ttl), None).await })
                .await
                .map_err(plain)?;
            Ok(r.id())
        }))
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFut<'_, Result<()>> {
        Box::pin(observe("keep_alive", async move {
            self.keepalives.refresh(&self.members, lease).await
        }))
    }

    fn revoke(&self, lease: LeaseId) -> BoxFut<'_, Result<()>> {
        Box::pin(observe("revoke", async move {
            self.keepalives.forget(lease);
            match self
                .members
                .call(|mut c| async move { c.lease_revoke(lease).await })
                .await
            {
                Ok(_) => Ok(()),
                // Already gone: what a revoke wanted.
                Err(Failure::Answer(e)) if is_not_found(&e) => Ok(()),
                Err(f) => Err(plain(f)),
            }
        }))
    }

    fn compact(&self, revision: i64) -> BoxFut<'_, Result<()>> {
        Box::pin(observe("compact", async move {
            self.members
                .call(|mut c| async move { c.compact(revision, None).await })
                .await
                .map_err(plain)?;
            Ok(())
        }))
    }

    fn watch(
        &self,
        prefix: &str,
        from_revision: i64,
    ) -> BoxFut<'_, Result<BoxStream<'static, Result<WatchEvent>>>> {
        let prefix = prefix.to_string();
        Box::pin(observe("watch", async move {
            let mut opts = WatchOptions::new().with_prefix();
            if from_revision > 0 {
                opts = opts.with_start_revision(from_revision);
            }
            let mut last = String::from("no member tried");
            for i in self.members.order() {
                let c = self.members.list[i].client.clone();
                let opened = tokio::time::timeout(
                    ATTEMPT_TIMEOUT,
                    c.watch_client()
                        .max_decoding_message_size(MAX_DECODE_BYTES)
                        .watch(prefix.clone(), Some(opts.clone())),
                )
                .await;
                let stream = match opened {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => match classify(e) {
                        Failure::Member(why) => {
                            self.members.mark_down(i, &why);
                            last = why;
                            continue;
                        }
                        Failure::Answer(e) => return Err(StoreError::Unavailable(e.to_string())),
                    },
                    Err(_) => {
                        self.members.mark_down(i, "watch not created in time");
                        last = "watch not created in time".into();
                        continue;
                    }
                };
                self.members.mark_up(i);
                return Ok(watch_events(
                    stream,
                    self.members.list[i].healthy.subscribe(),
                ));
            }
            Err(StoreError::Unavailable(format!(
                "cannot watch {prefix} on any etcd member (last: {last})"
            )))
        }))
    }
}

/// The events of an etcd watch stream, ending with an error once its member is marked down.
fn watch_events(
    stream: etcd_client::WatchStream,
    mut healthy: tokio::sync::watch::Receiver<bool>,
) -> BoxStream<'static, Result<WatchEvent>> {
    let events = stream.flat_map(|r| {
        let items: Vec<Result<WatchEvent>> = match r {
            Err(e) => vec![Err(StoreError::Unavailable(e.to_string()))],
            Ok(resp) if resp.compact_revision() > 0 => {
                vec![Err(StoreError::Compacted(resp.compact_revision()))]
            }
            Ok(resp) if resp.canceled() => vec![Err(StoreError::Unavailable(format!(
                "watch cancelled by etcd: {}",
                resp.cancel_reason()
            )))],
            Ok(resp) => {
                let rev = resp.header().map_or(0, |h| h.revision());
                resp.events()
                    .iter()
                    .filter_map(|e| {
                        let k = e.kv()?;
                        Some(Ok(match e.event_type() {
                            EventType::Put => WatchEvent::Put(kv(k)),
                            EventType::Delete => WatchEvent::Delete {
                                key: String::from_utf8_lossy(k.key()).into_owned(),
                                revision: k.mod_revision().max(rev),
                            },
                        }))
                    })
                    .collect()
            }
        };
        futures::stream::iter(items)
    });
    let down = futures::stream::once(async move {
        let _ = wait_until(&mut healthy, |h| !*h).await;
        Err(StoreError::Unavailable("etcd member marked down".into()))
    });
    // A stream that ends (member closed it) ends the watch too.
    let ended =
        futures::stream::once(async { Err(StoreError::Unavailable("watch stream ended".into())) });
    futures::stream::select(events.chain(ended), down).boxed()
}
