//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does it:
//! a replica takes the Lease when its holder has not renewed it for a lease duration *as this
//! replica measured it* (its own clock, from when it saw the record change: replicas' clocks
//! need not agree), writes with the Lease's resourceVersion (two replicas cannot both win), and
//! stops leading when it could not renew within the renew deadline. kube-rs has no leader
//! election of its own.

use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{api::PostParams, Api};
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct Timing {
    /// How long a Lease not renewed keeps others waiting.
    pub duration: Duration,
    /// The leader gives up when it could not renew for this long (shorter than `duration`, so
    /// it stops before another replica may start).
    pub renew_deadline: Duration,
    /// How often the leader renews and the others try.
    pub retry: Duration,
}

impl Timing {
    /// client-go's defaults: 15 s, 10 s, 2 s.
    pub fn from_duration(duration: Duration) -> Timing {
        Timing {
            duration,
            renew_deadline: duration * 2 / 3,
            retry: duration * 2 / 15,
        }
    }
}

/// The holder and renew time last seen, and when this replica saw them change.
#[derive(Debug)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    at: Instant,
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    observed: Option<Observed>,
}

/// What a replica may do with the Lease as it stands.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// Ours: renew it.
    Renew,
    /// Free or expired: take it (a new transition).
    Take,
    /// Another replica holds it.
    Wait(String),
}

fn decide(identity: &str, holder: Option<&str>, expired: bool) -> Decision {
    match holder {
        Some(h) if h == identity => Decision::Renew,
        Some(h) if !h.is_empty() && !expired => Decision::Wait(h.to_string()),
        _ => Decision::Take,
    }
}

impl Elector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: Timing) -> Elector {
        Elector {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            timing,
            observed: None,
        }
    }

    fn spec(&self, now: MicroTime, acquire: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.duration.as_secs().max(1) as i32),
            acquire_time: acquire,
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One attempt to take or renew the Lease: true when this replica holds it afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool> {
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now.clone(), Some(now), 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|o| o.holder != spec.holder_identity || o.renew_time != spec.renew_time);
        if changed {
            self.observed = Some(Observed {
                holder: spec.holder_identity.clone(),
                renew_time: spec.renew_time.clone(),
                at: Instant::now(),
            });
        }
        let seen = self.observed.as_ref().expect("set above").at;
        let duration = spec
            .lease_duration_seconds
            .map_or(self.timing.duration, |s| {
                Duration::from_secs(s.max(0) as u64)
            });
        let expired = seen.elapsed() >= duration;
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(
            match decide(&self.identity, spec.holder_identity.as_deref(), expired) {
                Decision::Wait(_) => return Ok(false),
                Decision::Renew => self.spec(now, spec.acquire_time, transitions),
                Decision::Take => self.spec(now.clone(), Some(now), transitions + 1),
            },
        );
        // The resourceVersion read above makes this a compare-and-swap.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&mut self) {
        let mut said_waiting = None;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "leading");
                    return;
                }
                Ok(false) => {
                    let holder = self.observed.as_ref().and_then(|o| o.holder.clone());
                    if holder != said_waiting {
                        info!(lease = %self.name, holder = ?holder, "another replica leads; standing by");
                        said_waiting = holder;
                    }
                }
                Err(e) => warn!(lease = %self.name, "reading the Lease: {e:#}"),
            }
            tokio::time::sleep(self.timing.retry).await;
        }
    }

    /// Renews the Lease until a renewal has failed for the renew deadline; then returns, and
    /// the caller must stop acting as leader.
    pub async fn hold(&mut self) {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.name, "another replica took the Lease");
                    return;
                }
                Err(e) => warn!(lease = %self.name, "renewing the Lease: {e:#}"),
            }
            if renewed.elapsed() >= self.timing.renew_deadline {
                warn!(lease = %self.name, "could not renew the Lease in {:?}", self.timing.renew_deadline);
                return;
            }
        }
    }

    /// Gives the Lease up (on shutdown) so that a standby takes over at once rather than after
    /// a lease duration.
    pub async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        if let Err(e) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            warn!(lease = %self.name, "releasing the Lease: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_taken_only_when_free_expired_or_ours() {
        assert_eq!(decide("a", Some("a"), false), Decision::Renew);
        assert_eq!(decide("a", Some("a"), true), Decision::Renew);
        assert_eq!(decide("a", Some("b"), false), Decision::Wait("b".into()));
        assert_eq!(decide("a", Some("b"), true), Decision::Take);
        assert_eq!(decide("a", None, false), Decision::Take);
        assert_eq!(decide("a", Some(""), false), Decision::Take);
    }

    #[test]
    fn timing_keeps_the_deadline_inside_the_duration() {
        let t = Timing::from_duration(Duration::from_secs(15));
        assert_eq!(t.renew_deadline, Duration::from_secs(10));
        assert_eq!(t.retry, Duration::from_secs(2));
    }
}
