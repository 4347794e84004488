//! Cyclonus (github.com/mattfenwick/cyclonus), the NetworkPolicy conformance generator Antrea
//! runs: it creates namespaces x, y and z with pods a, b and c (agnhost, serving TCP and UDP on
//! ports 80 and 81) and a Service each, then, case by case, writes policies, changes pods and
//! labels, and probes every pair of pods on every port and protocol through the exec API,
//! comparing what connects with what the policies mean. Built by `cargo xtask setup`, run from the
//! lab namespace as the cluster admin. Results come from its JUnit file: one test case per
//! generated case, passed when every probe of every step agreed.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    agnhost_image,
    conformance::{Spec, SuiteResult},
    kube_bin, Cluster,
};

/// The cases `cargo xtask conformance` runs by default: the upstream e2e cases as Cyclonus
/// generates them (what Antrea's CI runs) and the conflicting-policy cases.
pub const DEFAULT_TAGS: &[&str] = &["upstream-e2e", "conflict"];

/// The agnhost Cyclonus pins (`probe/pod.go`); the lab has the release's, whose
/// `serve-hostname`, `porter` and `connect` commands are the ones Cyclonus runs.
const CYCLONUS_AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.43";

/// Runs the generated cases with any of `tags` (see Cyclonus's `generator/tags.go`) against
/// `cluster`, writing its log and JUnit file under `out`. Cyclonus waits for every probe it
/// execs, and a probe whose exec stream hangs would hold it for ever: past `limit` it is ended
/// and the run is an error.
pub fn run(cluster: &Cluster, tags: &[&str], out: &Path, limit: Duration) -> Result<SuiteResult> {
    std::fs::create_dir_all(out)?;
    for node in &cluster.nodes {
        crate::sh(&mut node.ctr(&[
            "images",
            "tag",
            "--force",
            &agnhost_image(),
            CYCLONUS_AGNHOST,
        ]))?;
    }
    let junit = out.join("cyclonus.xml");
    let log = out.join("cyclonus.log");
    let _ = std::fs::remove_file(&junit);
    let started = Instant::now();
    let mut cyclonus = Command::new("ip")
        .args(["netns", "exec", &cluster.switch.name])
        .arg(kube_bin("cyclonus"))
        .env("KUBECONFIG", cluster.kubeconfig())
        .arg("generate")
        .arg(format!("--include={}", tags.join(",")))
        // Cyclonus excludes some tags by default (upstream-e2e among them); the include decides.
        .arg("--exclude=")
        // This machine's kernel has no SCTP sockets, and Sluice's datapath has no SCTP.
        .arg("--server-protocol=tcp,udp")
        .args(["--job-timeout-seconds=2", "--perturbation-wait-seconds=5"])
        .arg("--pod-creation-timeout-seconds=300")
        .arg("--cleanup-namespaces=true")
        .arg(format!("--junit-results-file={}", junit.display()))
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(out.join("cyclonus.stderr"))?)
        .spawn()
        .context("running cyclonus")?;
    let status = loop {
        if let Some(status) = cyclonus.try_wait()? {
            break status;
        }
        if started.elapsed() > limit {
            let _ = cyclonus.kill();
            let _ = cyclonus.wait();
            bail!(
                "cyclonus did not finish within {limit:?}; its last case is at the end of {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    // Cyclonus exits 0 whatever the cases found; non-zero means it could not run them.
    if !status.success() {
        bail!("cyclonus failed ({status}); see {}", log.display());
    }
    let text = std::fs::read_to_string(&junit)
        .with_context(|| format!("cyclonus wrote no {}", junit.display()))?;
    let mut result = parse(&text)?;
    result.seconds = started.elapsed().as_secs_f64();
    Ok(result)
}

/// The test cases of Cyclonus's JUnit file (Go's encoding/xml, one `<testcase>` per case, a
/// `<failure>` inside those that failed).
fn parse(junit: &str) -> Result<SuiteResult> {
    let mut specs = Vec::new();
    for case in junit.split("<testcase ").skip(1) {
        let body = case.split("</testcase>").next().unwrap_or(case);
        let name = body
            .split_once(" name=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(name, _)| unescape(name))
            .with_context(|| format!("a test case without a name: {body:?}"))?;
        let failed = body.contains("<failure");
        specs.push(Spec {
            name,
            state: if failed { "failed" } else { "passed" }.to_string(),
            reason: failed.then(|| "probes disagreed with the policies: see cyclonus.log".into()),
            seconds: 0.0,
        });
    }
    if specs.is_empty() {
        bail!("the JUnit file holds no test case");
    }
    let failed = specs.iter().filter(|s| s.state == "failed").count();
    Ok(SuiteResult {
        suite: "cyclonus".to_string(),
        passed: specs.len() - failed,
        failed,
        skipped: 0,
        seconds: 0.0,
        specs,
    })
}

/// XML character references as Go's encoding/xml writes them.
fn unescape(text: &str) -> String {
    text.replace("&#34;", "\"")
        .replace("&#39;", "'")
        .replace("&#x9;", "\t")
        .replace("&#xA;", "\n")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_counts_cases_and_failures() {
        let junit = r#"<testsuite tests="0" failures="1" time="" name="cyclonus">
    <properties></properties>
    <testcase classname="" name="should allow &#34;x/a&#34; &amp; deny the rest" time="">
        <failure message="" type=""></failure>
    </testcase>
    <testcase classname="" name="ingress: allow all" time=""></testcase>
</testsuite>"#;
        let result = parse(junit).unwrap();
        assert_eq!((result.passed, result.failed), (1, 1));
        assert_eq!(result.specs[0].name, "should allow \"x/a\" & deny the rest");
        assert_eq!(result.specs[0].state, "failed");
        assert_eq!(result.specs[1].state, "passed");
        assert!(parse("<testsuite></testsuite>").is_err());
    }
}
