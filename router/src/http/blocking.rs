//! CPU-heavy request work (JSON parsing, chat-template rendering, tokenization) off the async
//! workers: on tokio's blocking pool, at most `slots` at once. Tokenizing two 8 MB prompts on
//! the async workers froze `/health` for 7-16 s; here the workers keep serving, and a burst
//! of large prompts queues for a slot instead of taking every blocking thread.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::error::ApiError;

/// A bound on concurrent blocking request work.
#[derive(Debug, Clone)]
pub struct BlockingPool {
    slots: Arc<Semaphore>,
}

impl BlockingPool {
    /// At most `slots` (at least 1) jobs at once.
    pub fn new(slots: usize) -> BlockingPool {
        BlockingPool {
            slots: Arc::new(Semaphore::new(slots.clamp(1, Semaphore::MAX_PERMITS))),
        }
    }

    /// One slot per available CPU.
    pub fn per_cpu() -> BlockingPool {
        BlockingPool::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Runs `f` on the blocking pool once a slot is free. The slot is held by the job itself,
    /// so a client that leaves while its job runs does not free a slot early.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::Unavailable("the tokenizer pool is closed".into()))?;
        tokio::task::spawn_blocking(move || {
            let _slot = permit;
            f()
        })
        .await
        .map_err(|e| ApiError::Internal(format!("request preparation failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn the_runtime_keeps_serving_while_a_job_runs() {
        // The job waits for a message that only the runtime's one thread can send: run inline
        // on that thread, it would time out.
        let pool = BlockingPool::new(1);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let job = pool.run(move || rx.recv_timeout(Duration::from_secs(20)).is_ok());
        let other = async move {
            tokio::task::yield_now().await;
            tx.send(()).expect("send");
        };
        let (got, ()) = tokio::join!(job, other);
        assert!(got.expect("ran"), "the runtime ran while the job waited");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_most_slots_jobs_run_at_once() {
        let pool = BlockingPool::new(2);
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (release, _) = tokio::sync::broadcast::channel::<()>(1);
        let mut jobs = Vec::new();
        for _ in 0..5 {
            let (pool, running, peak) = (pool.clone(), running.clone(), peak.clone());
            let mut go = release.subscribe();
            jobs.push(tokio::spawn(async move {
                pool.run(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    // Wait for the release (or, once released, go on at once).
                    let _ = go.blocking_recv();
                    running.fetch_sub(1, Ordering::SeqCst);
                })
                .await
            }));
        }
        while running.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        let _ = release.send(());
        for j in jobs {
            j.await.expect("join").expect("ran");
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2);
    }
}
