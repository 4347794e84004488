//! The agent's Prometheus metrics, served on `/metrics` beside `/healthz` (text format 0.0.4).
//! Few and plain: atomics the control loop sets, rendered on request.

use std::{
    fmt::Write,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

#[derive(Debug, Default)]
pub struct Metrics {
    /// Policy programming rounds that could not write everything (and failed closed).
    pub policy_sync_failures: AtomicU64,
    /// The last policy programming round failed closed: some pods allow less than their
    /// policies say.
    pub policy_fail_closed: AtomicBool,
    /// Programming rounds in which a part failed (each is retried).
    pub program_round_failures: AtomicU64,
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "sluice_policy_sync_failures_total",
            "counter",
            "NetworkPolicy programming rounds that could not write every entry (they fail closed).",
            self.policy_sync_failures.load(Ordering::Relaxed),
        );
        metric(
            "sluice_policy_fail_closed",
            "gauge",
            "1 while the programmed NetworkPolicy is tighter than desired after a failed write.",
            self.policy_fail_closed.load(Ordering::Relaxed) as u64,
        );
        metric(
            "sluice_program_round_failures_total",
            "counter",
            "Programming rounds in which a part (routes, policy, uplink, Services, external IPs) failed; each is retried.",
            self.program_round_failures.load(Ordering::Relaxed),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let m = Metrics::default();
        m.policy_sync_failures.fetch_add(2, Ordering::Relaxed);
        m.policy_fail_closed.store(true, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains("# TYPE sluice_policy_sync_failures_total counter\nsluice_policy_sync_failures_total 2\n"), "{text}");
        assert!(text.contains("\nsluice_policy_fail_closed 1\n"), "{text}");
    }
}
