//! The etcd implementation (etcd v3 API through `etcd-client`).

use std::time::Duration;

use etcd_client::{
    Client, Compare as ECompare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use futures::StreamExt;
use futures::stream::BoxStream;

use super::*;
use crate::telemetry::store_metrics::observe;

/// A store on an etcd cluster (cheap to clone).
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").finish()
    }
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// etcd reports a missing lease only in the error text ("lease not found").
fn lease_error(e: etcd_client::Error, lease: LeaseId) -> StoreError {
    if e.to_string().contains("lease not found") {
        StoreError::LeaseGone(lease)
    } else {
        unavailable(e)
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

impl EtcdStore {
    /// Connects to the comma-separated endpoints (`http://127.0.0.1:2379,...`).
    pub async fn connect(endpoints: &str) -> Result<EtcdStore> {
        let eps: Vec<&str> = endpoints
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        let client = Client::connect(eps, Some(opts))
            .await
            .map_err(unavailable)?;
        Ok(EtcdStore { client })
    }
}

impl MetaStore for EtcdStore {
    fn get(&self, key: &str) -> BoxFut<'_, Result<Option<KeyValue>>> {
        let (mut c, key) = (self.client.clone(), key.to_string());
        Box::pin(observe("get", async move {
            Ok(c.get(key, None)
                .await
                .map_err(unavailable)?
                .kvs()
                .first()
                .map(kv))
        }))
    }

    fn list(&self, prefix: &str) -> BoxFut<'_, Result<(Vec<KeyValue>, i64)>> {
        let (mut c, prefix) = (self.client.clone(), prefix.to_string());
        Box::pin(observe("list", async move {
            let r = c
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .map_err(unavailable)?;
            let rev = r.header().map_or(0, |h| h.revision());
            Ok((r.kvs().iter().map(kv).collect(), rev))
        }))
    }

    fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> BoxFut<'_, Result<i64>> {
        let (mut c, key) = (self.client.clone(), key.to_string());
        Box::pin(observe("put", async move {
            let opts = lease.map(|l| PutOptions::new().with_lease(l));
            let r = c.put(key, value, opts).await.map_err(|e| match lease {
                Some(l) => lease_error(e, l),
                None => unavailable(e),
            })?;
            Ok(r.header().map_or(0, |h| h.revision()))
        }))
    }

    fn delete(&self, key: &str) -> BoxFut<'_, Result<()>> {
        let (mut c, key) = (self.client.clone(), key.to_string());
        Box::pin(observe("delete", async move {
            c.delete(key, None).await.map_err(unavailable)?;
            Ok(())
        }))
    }

    fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> BoxFut<'_, Result<bool>> {
        let mut c = self.client.clone();
        Box::pin(observe("txn", async move {
            let when: Vec<ECompare> = compares
                .into_iter()
                .map(|cmp| match cmp {
                    Compare::Absent(k) => ECompare::create_revision(k, CompareOp::Equal, 0),
                    Compare::Value(k, v) => ECompare::value(k, CompareOp::Equal, v),
                    Compare::ModRevision(k, r) => ECompare::mod_revision(k, CompareOp::Equal, r),
                })
                .collect();
            let then: Vec<TxnOp> = ops
                .into_iter()
                .map(|op| match op {
                    Op::Put { key, value, lease } => {
                        TxnOp::put(key, value, lease.map(|l| PutOptions::new().with_lease(l)))
                    }
                    Op::Delete(key) => TxnOp::delete(key, None),
                })
                .collect();
            let r = c
                .txn(Txn::new().when(when).and_then(then))
                .await
                .map_err(unavailable)?;
            Ok(r.succeeded())
        }))
    }

    fn grant(&self, ttl: Duration) -> BoxFut<'_, Result<LeaseId>> {
        let mut c = self.client.clone();
        Box::pin(observe("grant", async move {
            Ok(c.lease_grant(ttl.as_secs().max(1) as i64, None)
                .await
                .map_err(unavailable)?
                .id())
        }))
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFut<'_, Result<()>> {
        let mut c = self.client.clone();
        Box::pin(observe("keep_alive", async move {
            let (mut keeper, mut stream) = c
                .lease_keep_alive(lease)
                .await
                .map_err(|e| lease_error(e, lease))?;
            keeper
                .keep_alive()
                .await
                .map_err(|e| lease_error(e, lease))?;
            match stream.message().await.map_err(|e| lease_error(e, lease))? {
                Some(r) if r.ttl() > 0 => Ok(()),
                Some(_) => Err(StoreError::LeaseGone(lease)),
                None => Err(StoreError::Unavailable("keep-alive stream closed".into())),
            }
        }))
    }

    fn revoke(&self, lease: LeaseId) -> BoxFut<'_, Result<()>> {
        let mut c = self.client.clone();
        Box::pin(observe("revoke", async move {
            c.lease_revoke(lease).await.map_err(unavailable)?;
            Ok(())
        }))
    }

    fn watch(
        &self,
        prefix: &str,
        from_revision: i64,
    ) -> BoxFut<'_, Result<BoxStream<'static, Result<WatchEvent>>>> {
        let (mut c, prefix) = (self.client.clone(), prefix.to_string());
        Box::pin(observe("watch", async move {
            let mut opts = WatchOptions::new().with_prefix();
            if from_revision > 0 {
                opts = opts.with_start_revision(from_revision);
            }
            let stream = c.watch(prefix, Some(opts)).await.map_err(unavailable)?;
            let events = stream.flat_map(|r| {
                let items: Vec<Result<WatchEvent>> = match r {
                    Err(e) => vec![Err(unavailable(e))],
                    Ok(resp) if resp.compact_revision() > 0 => {
                        vec![Err(StoreError::Compacted(resp.compact_revision()))]
                    }
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
            Ok(events.boxed())
        }))
    }
}
