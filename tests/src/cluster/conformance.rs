//! The upstream Kubernetes conformance suites against Sluice: the release's own `e2e.test`
//! (built by `cargo xtask setup`), run from the lab namespace as the cluster admin, one suite at
//! a time (Ginkgo runs its specs serially without its CLI). Results come from Ginkgo's JSON
//! report: every spec of the suite passed, failed (with Ginkgo's message), or skipped — by us,
//! with the reason in [`Suite::skips`], or by the test itself, with its own message.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::{kube_bin, Cluster};

pub struct Suite {
    pub name: &'static str,
    /// Specs whose full name starts with this.
    pub prefix: &'static str,
    /// Specs left out, by a part of their name, with the reason.
    pub skips: &'static [(&'static str, &'static str)],
}

/// Reasons shared by the suites.
const NO_SCTP: &str =
    "SCTP: this machine's kernel has no SCTP sockets (protocol not supported), and Sluice's \
     datapath does not implement SCTP";
const NEEDS_CLOUD_LB: &str = "needs a cloud load balancer; the lab has none";
const NEEDS_SSH: &str = "restarts a control-plane process over SSH on the cloud's nodes";
const NO_KUBE_PROXY: &str = "restarts kube-proxy; a Sluice cluster runs none";

pub const NETPOL: Suite = Suite {
    name: "netpol",
    prefix: "[sig-network] Netpol ",
    // The specs "even if the plugin doesn't support SCTP" serve TCP and run.
    skips: &[("[Feature:SCTPConnectivity]", NO_SCTP)],
};

pub const SERVICES: Suite = Suite {
    name: "services",
    prefix: "[sig-network] Services ",
    skips: &[
        ("basic SCTP service", NO_SCTP),
        ("Type LoadBalancer", NEEDS_CLOUD_LB),
        ("after restarting apiserver", NEEDS_SSH),
        ("after restarting kube-proxy", NO_KUBE_PROXY),
    ],
};

pub const SUITES: [&Suite; 2] = [&NETPOL, &SERVICES];

pub fn suite(name: &str) -> Result<&'static Suite> {
    SUITES
        .iter()
        .copied()
        .find(|s| s.name == name)
        .with_context(|| format!("no conformance suite {name:?} (netpol, services)"))
}

#[derive(Clone, Debug, Serialize)]
pub struct Spec {
    pub name: String,
    /// `passed`, `failed` or `skipped`.
    pub state: String,
    /// The failure message, or why it was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SuiteResult {
    pub suite: String,
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub seconds: f64,
    pub specs: Vec<Spec>,
}

/// A regular expression matching `text` literally.
fn escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$".contains(c);
            special
                .then_some('\\')
                .into_iter()
                .chain(std::iter::once(c))
        })
        .collect()
}

/// Runs `suite` against `cluster` (when `only` names parts of spec names, just the specs whose
/// name contains one of them), writing Ginkgo's report and log under `out`.
pub fn run(cluster: &Cluster, suite: &Suite, only: &[&str], out: &Path) -> Result<SuiteResult> {
    std::fs::create_dir_all(out)?;
    let report = out.join(format!("{}.json", suite.name));
    let log = out.join(format!("{}.log", suite.name));
    let mut focus = escape(suite.prefix);
    if !only.is_empty() {
        let parts: Vec<String> = only.iter().map(|o| escape(o)).collect();
        focus = format!("{focus}.*({})", parts.join("|"));
    }
    let skip: Vec<String> = suite.skips.iter().map(|(part, _)| escape(part)).collect();
    let started = Instant::now();
    let mut e2e = Command::new("ip");
    e2e.args(["netns", "exec", &cluster.switch.name])
        .arg(kube_bin("e2e.test"))
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .args([
            "--provider",
            "local",
            "--ginkgo.no-color",
            "--ginkgo.silence-skips",
        ])
        .args(["--ginkgo.timeout", "4h"])
        .arg(format!("--ginkgo.focus={focus}"))
        .arg(format!("--ginkgo.skip={}", skip.join("|")))
        .arg(format!("--ginkgo.json-report={}", report.display()))
        .arg(format!("--report-dir={}", out.display()))
        .current_dir(out)
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(
            out.join(format!("{}.stderr", suite.name)),
        )?);
    // A failing spec makes e2e.test exit non-zero; the report says which.
    let status = e2e.status().context("running e2e.test")?;
    let text = std::fs::read_to_string(&report).with_context(|| {
        format!(
            "e2e.test ({status}) wrote no report {}; see {}",
            report.display(),
            log.display()
        )
    })?;
    let mut result = parse(suite, only, &serde_json::from_str(&text)?)?;
    result.seconds = started.elapsed().as_secs_f64();
    Ok(result)
}

fn parse(suite: &Suite, only: &[&str], report: &Value) -> Result<SuiteResult> {
    let mut specs = Vec::new();
    for spec in report[0]["SpecReports"].as_array().into_iter().flatten() {
        if spec["LeafNodeType"] != "It" {
            continue;
        }
        let mut parts: Vec<&str> = spec["ContainerHierarchyTexts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        parts.push(spec["LeafNodeText"].as_str().unwrap_or_default());
        let name = parts.join(" ");
        let chosen = only.is_empty() || only.iter().any(|o| name.contains(o));
        if !name.starts_with(suite.prefix) || !chosen {
            continue;
        }
        let ours = suite.skips.iter().find(|(part, _)| name.contains(part));
        let state = spec["State"].as_str().unwrap_or("unknown").to_string();
        let (state, reason) = match (ours, state.as_str()) {
            (Some((_, why)), _) => ("skipped".to_string(), Some(why.to_string())),
            (None, "passed") => (state.clone(), None),
            (None, "skipped") => (
                state.clone(),
                // A spec the test skipped says why; one without a message never ran (the run
                // was interrupted before it).
                Some(failure(spec).unwrap_or_else(|| "not run: the run ended before it".into())),
            ),
            // failed, panicked, interrupted, timedout: failures.
            (None, _) => (
                "failed".to_string(),
                Some(format!("{state}: {}", failure(spec).unwrap_or_default())),
            ),
        };
        specs.push(Spec {
            name,
            state,
            reason,
            seconds: spec["RunTime"].as_f64().unwrap_or(0.0) / 1e9,
        });
    }
    if specs.is_empty() {
        bail!("the report holds no spec of suite {}", suite.name);
    }
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    let count = |s: &str| specs.iter().filter(|x| x.state == s).count();
    Ok(SuiteResult {
        suite: suite.name.to_string(),
        passed: count("passed"),
        failed: count("failed"),
        skipped: count("skipped"),
        seconds: 0.0,
        specs,
    })
}

fn failure(spec: &Value) -> Option<String> {
    let message = spec["Failure"]["Message"].as_str()?;
    // The first lines say what happened; the rest is the probe matrix or a dump.
    Some(message.lines().take(6).collect::<Vec<_>>().join("\n"))
}

impl SuiteResult {
    /// The summary line and one line per spec that did not pass.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{}: {} passed, {} failed, {} skipped in {:.0} s\n",
            self.suite, self.passed, self.failed, self.skipped, self.seconds
        );
        for spec in self.specs.iter().filter(|s| s.state != "passed") {
            let reason = spec.reason.as_deref().unwrap_or_default();
            let first = reason.lines().next().unwrap_or_default();
            out += &format!("  {:7} {}\n          {first}\n", spec.state, spec.name);
        }
        out
    }
}

/// Where `cargo xtask conformance` and the tests write reports.
pub fn output_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/conformance")
        .join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_quotes_regex_syntax() {
        assert_eq!(escape("[sig-network] Netpol"), "\\[sig-network\\] Netpol");
        assert_eq!(escape("a.b(c)|d"), "a\\.b\\(c\\)\\|d");
    }

    #[test]
    fn parse_counts_states_and_gives_reasons() {
        let report = serde_json::json!([{"SpecReports": [
            {"LeafNodeType": "It", "ContainerHierarchyTexts": ["[sig-network] Services"],
             "LeafNodeText": "should serve a basic endpoint", "State": "passed", "RunTime": 2e9},
            {"LeafNodeType": "It", "ContainerHierarchyTexts": ["[sig-network] Services"],
             "LeafNodeText": "should allow creating a basic SCTP service", "State": "skipped", "RunTime": 0},
            {"LeafNodeType": "It", "ContainerHierarchyTexts": ["[sig-network] Services"],
             "LeafNodeText": "should hairpin", "State": "failed", "RunTime": 1e9,
             "Failure": {"Message": "timed out\nmore"}},
            {"LeafNodeType": "It", "ContainerHierarchyTexts": ["[sig-network] Services"],
             "LeafNodeText": "needs two zones", "State": "skipped", "RunTime": 0,
             "Failure": {"Message": "Requires at least 2 zones"}},
            {"LeafNodeType": "It", "ContainerHierarchyTexts": ["[sig-apps] Deployment"],
             "LeafNodeText": "not ours", "State": "skipped"},
            {"LeafNodeType": "ReportBeforeSuite", "State": "passed"},
        ]}]);
        let result = parse(&SERVICES, &[], &report).unwrap();
        assert_eq!((result.passed, result.failed, result.skipped), (1, 1, 2));
        let reason = |part: &str| {
            result
                .specs
                .iter()
                .find(|s| s.name.contains(part))
                .and_then(|s| s.reason.clone())
                .unwrap()
        };
        assert_eq!(reason("SCTP"), NO_SCTP);
        assert_eq!(reason("hairpin"), "failed: timed out\nmore");
        assert_eq!(reason("zones"), "Requires at least 2 zones");
        assert!(
            parse(&NETPOL, &[], &report).is_err(),
            "no Netpol spec in it"
        );
    }
}
