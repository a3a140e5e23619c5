//! The etcd store: one key per object under the prefix, conditional
//! transactions on mod revisions, leases, and watches that report
//! compaction instead of skipping events.

use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;

use super::{
    Compare, KeyValue, LeaseId, Op, Result, StoreError, TxnOutcome, WatchEvent, WatchMessage,
};

/// Keys per page when listing a prefix.
const LIST_PAGE: i64 = 500;

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: up to the end of the key space.
    vec![0]
}

/// How the control plane connects to etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// Bound on every unary call, so that a partitioned etcd fails fast.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// TLS to etcd (`https://` endpoints), with a client certificate.
    pub tls: Option<etcd_client::TlsOptions>,
}

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    endpoints: Vec<String>,
    timeout: Duration,
}

impl EtcdStore {
    pub async fn connect(opts: EtcdOptions) -> Result<Self> {
        // require_leader: a member cut off from the quorum answers with an
        // error instead of serving stale reads or hanging watches.
        let mut connect = ConnectOptions::new()
            .with_require_leader(true)
            .with_connect_timeout(opts.connect_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        if let Some(tls) = opts.tls.clone() {
            connect = connect.with_tls(tls);
        }
        let client = tokio::time::timeout(
            opts.connect_timeout,
            Client::connect(opts.endpoints.clone(), Some(connect)),
        )
        .await
        .map_err(|_| StoreError::Timeout(opts.connect_timeout))??;
        Ok(Self {
            client,
            prefix: opts.prefix,
            endpoints: opts.endpoints,
            timeout: opts.request_timeout,
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn relative(&self, key: &[u8]) -> String {
        let key = String::from_utf8_lossy(key);
        key.strip_prefix(&self.prefix).unwrap_or(&key).to_string()
    }

    async fn bounded<T>(
        &self,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        tokio::time::timeout(self.timeout, f)
            .await
            .map_err(|_| StoreError::Timeout(self.timeout))?
            .map_err(StoreError::from)
    }

    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let mut kv = self.client.kv_client();
        let resp = self.bounded(kv.get(self.full(key), None)).await?;
        Ok(resp.kvs().first().map(|kv| KeyValue {
            key: key.to_string(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
        }))
    }

    /// Lists in pages of [`LIST_PAGE`] keys, every page at the revision of
    /// the first, so that a large prefix neither hits the transport's message
    /// limit nor mixes revisions.
    pub async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64)> {
        let mut kv = self.client.kv_client();
        let full = self.full(prefix);
        let end = prefix_end(full.as_bytes());
        let mut start = full.into_bytes();
        let mut revision = 0;
        let mut out = Vec::new();
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = self.bounded(kv.get(start.clone(), Some(opts))).await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            out.extend(resp.kvs().iter().map(|kv| KeyValue {
                key: self.relative(kv.key()),
                value: kv.value().to_vec(),
                mod_revision: kv.mod_revision(),
            }));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    // The next page starts just after the last key.
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok((out, revision)),
            }
        }
    }

    pub async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome> {
        let when: Vec<EtcdCompare> = compares
            .iter()
            .map(|c| EtcdCompare::mod_revision(self.full(&c.key), CompareOp::Equal, c.mod_revision))
            .collect();
        let then: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => {
                    let opts = lease.map(|l| PutOptions::new().with_lease(l));
                    TxnOp::put(self.full(&key), value, opts)
                }
                Op::Delete { key } => TxnOp::delete(self.full(&key), None),
            })
            .collect();
        let mut kv = self.client.kv_client();
        let resp = self
            .bounded(kv.txn(Txn::new().when(when).and_then(then)))
            .await;
        let resp = match resp {
            Ok(r) => r,
            // A put with a lease that expired is refused by etcd as an error;
            // to callers it is a failed guard, as in the memory store.
            Err(StoreError::Etcd(e)) if e.to_string().contains("requested lease not found") => {
                return Ok(TxnOutcome {
                    succeeded: false,
                    revision: 0,
                });
            }
            Err(e) => return Err(e),
        };
        Ok(TxnOutcome {
            succeeded: resp.succeeded(),
            revision: resp.header().map_or(0, |h| h.revision()),
        })
    }

    pub async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let mut lease = self.client.lease_client();
        let ttl = ttl.as_secs().max(1) as i64;
        Ok(self.bounded(lease.grant(ttl, None)).await?.id())
    }

    pub async fn keep_alive(&self, id: LeaseId) -> Result<()> {
        let mut lease = self.client.lease_client();
        let timeout = self.timeout;
        let renewed = tokio::time::timeout(timeout, async move {
            let (mut keeper, mut stream) = lease.keep_alive(id).await?;
            keeper.keep_alive().await?;
            Ok::<_, etcd_client::Error>(stream.message().await?.map(|r| r.ttl()))
        })
        .await
        .map_err(|_| StoreError::Timeout(timeout))?;
        match renewed {
            Ok(Some(ttl)) if ttl > 0 => Ok(()),
            // etcd answers a renewal of an expired lease with TTL 0, or (as
            // etcd-client reports it) with a "lease not found" error.
            Ok(_) => Err(StoreError::LeaseGone(id)),
            Err(etcd_client::Error::LeaseKeepAliveError(msg)) if msg.contains("not found") => {
                Err(StoreError::LeaseGone(id))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn revoke_lease(&self, id: LeaseId) -> Result<()> {
        let mut lease = self.client.lease_client();
        self.bounded(lease.revoke(id)).await?;
        Ok(())
    }

    pub async fn compact(&self, revision: i64) -> Result<()> {
        let mut kv = self.client.kv_client();
        self.bounded(kv.compact(revision, None)).await?;
        Ok(())
    }

    pub async fn watch(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<mpsc::Receiver<Result<WatchMessage>>> {
        let mut watch = self.client.watch_client();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start_revision)
            .with_progress_notify();
        let mut stream = self
            .bounded(watch.watch(self.full(prefix), Some(opts)))
            .await?;
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let msg = match stream.message().await {
                    Ok(Some(resp)) => resp,
                    Ok(None) => {
                        let _ = tx
                            .send(Err(StoreError::Unavailable("etcd closed the watch".into())))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                if msg.compact_revision() > 0 {
                    let _ = tx
                        .send(Ok(WatchMessage::Compacted {
                            compact_revision: msg.compact_revision(),
                        }))
                        .await;
                    return;
                }
                if msg.canceled() {
                    let reason = format!("etcd canceled the watch: {}", msg.cancel_reason());
                    let _ = tx.send(Err(StoreError::Unavailable(reason))).await;
                    return;
                }
                let events: Vec<WatchEvent> = msg
                    .events()
                    .iter()
                    .filter_map(|ev| {
                        let kv = ev.kv()?;
                        let key = this.relative(kv.key());
                        Some(match ev.event_type() {
                            EventType::Put => WatchEvent::Put(KeyValue {
                                key,
                                value: kv.value().to_vec(),
                                mod_revision: kv.mod_revision(),
                            }),
                            EventType::Delete => WatchEvent::Delete {
                                key,
                                mod_revision: kv.mod_revision(),
                            },
                        })
                    })
                    .collect();
                // The revision of the last event, not the header's: while a
                // watcher catches up, etcd stamps each batch with the current
                // store revision, and resuming from that would skip the
                // events of the batches not yet received.
                let revision = events.last().map_or(0, |e| match e {
                    WatchEvent::Put(kv) => kv.mod_revision,
                    WatchEvent::Delete { mod_revision, .. } => *mod_revision,
                });
                if events.is_empty() {
                    // Progress notifications and the creation answer carry
                    // no events; nothing to pass on.
                    continue;
                }
                if tx
                    .send(Ok(WatchMessage::Events { revision, events }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(rx)
    }
}
