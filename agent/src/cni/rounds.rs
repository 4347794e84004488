//! Programming rounds a CNI ADD waits for: the pod it wired gets its policies (and so its
//! connectivity) from the follower's next round, and ADD answers once that round is done. A
//! request is covered by the first round that starts after it.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::sync::{watch, Notify};

#[derive(Clone)]
pub struct ProgramRounds {
    requested: Arc<AtomicU64>,
    done: Arc<watch::Sender<u64>>,
    /// What wakes the follower.
    wake: Arc<Notify>,
}

impl ProgramRounds {
    pub fn new(wake: Arc<Notify>) -> ProgramRounds {
        ProgramRounds {
            requested: Arc::new(AtomicU64::new(0)),
            done: Arc::new(watch::channel(0).0),
            wake,
        }
    }

    /// Asks for a round and waits until one that started after this call has finished;
    /// `false` when none did within `timeout`.
    pub async fn request(&self, timeout: Duration) -> bool {
        let want = self.requested.fetch_add(1, Ordering::AcqRel) + 1;
        let mut done = self.done.subscribe();
        self.wake.notify_one();
        tokio::time::timeout(timeout, done.wait_for(|&d| d >= want))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// A round starts: it covers every request made so far.
    pub fn start(&self) -> u64 {
        self.requested.load(Ordering::Acquire)
    }

    /// The round that returned `covered` from `start` is done (programmed or failed).
    pub fn finish(&self, covered: u64) {
        self.done.send_modify(|d| *d = (*d).max(covered));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_waits_for_a_round_that_starts_after_it() {
        let wake = Arc::new(Notify::new());
        let rounds = ProgramRounds::new(wake.clone());
        let before = rounds.start();
        let follower = {
            let rounds = rounds.clone();
            tokio::spawn(async move {
                // A round that started before the request does not answer it.
                rounds.finish(before);
                wake.notified().await;
                let covered = rounds.start();
                rounds.finish(covered);
            })
        };
        assert!(rounds.request(Duration::from_secs(5)).await);
        follower.await.unwrap();
        // Nobody programs: the request times out.
        assert!(!rounds.request(Duration::from_millis(50)).await);
    }
}
