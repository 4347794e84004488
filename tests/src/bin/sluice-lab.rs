//! sluice-lab: a real Kubernetes cluster on one machine (kube-apiserver, kubelets with
//! containerd in network namespaces, Sluice installed by its chart). Scripts depend on this
//! command line; keep it stable (`--kubernetes`, from when the lab could also be an API server
//! of our own, is accepted and changes nothing).
//!
//!   sluice-lab matrix --nodes N --manifests DIR [--manifests DIR2 ...] [--ports 80,81]
//!       [--protocols TCP,UDP] [--datapath ebpf] [--encap vxlan|geneve|noencap] [--values FILE]
//!       --json OUT.json
//!   sluice-lab demo [--manifests examples/demo] --json OUT.json
//!   sluice-lab up [--nodes N] [--encap vxlan|geneve|noencap] [--values FILE]
//!       (foreground; Ctrl-C or `down` ends it); sluice-lab kubeconfig
//!   sluice-lab conformance [--suites netpol,services,cyclonus] [--only TEXT] [--json OUT]
//!   sluice-lab apply -f FILE | status | down
//!   sluice-lab probe-service NS/NAME [--port N] [--udp] [--from NS/POD|NODE|external]
//!       [--frontend cluster-ip|node-port|load-balancer|external-ip] [--node NODE] [--count N]
//!
//! `apply` and `probe-service` hand their request to the running `up` through files under
//! `/run/sluice-lab/requests/`: that process knows the lab's ports (pods run the lab's pod
//! server on them) and reaches the pods' namespaces.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use sluice_tests::cluster::{conformance, cyclonus, Cluster, ClusterOptions};
use sluice_tests::lab::{
    demo, manifests,
    report::{expect, truth_table, Protocol, Report, Step},
    services::{Frontend, ServiceProbe, ServiceProbes},
    Encap,
};
use sluice_tests::probe::PROBE_TIMEOUT;

/// Where a running `up` keeps its control files.
const STATE_DIR: &str = "/run/sluice-lab";

#[derive(Parser)]
#[command(about = "A Sluice cluster on one machine")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bring a cluster up, apply each manifest directory in turn, probe every pod pair after
    /// each, write the JSON report, tear everything down.
    Matrix {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long = "manifests", required = true)]
        manifests: Vec<PathBuf>,
        #[arg(long, value_delimiter = ',', default_value = "80,81")]
        ports: Vec<u16>,
        #[arg(long, value_delimiter = ',', default_value = "TCP,UDP")]
        protocols: Vec<String>,
        #[arg(long, default_value = "ebpf")]
        datapath: String,
        #[arg(long, default_value = "vxlan")]
        encap: String,
        #[arg(long)]
        json: PathBuf,
        /// Exit 1 unless every probe connected and was answered by its destination (manifests
        /// without NetworkPolicy): the run is then a smoke test.
        #[arg(long)]
        expect_all_connected: bool,
        /// A values file for the chart (deploy/chart/sluice), after the lab's own.
        #[arg(long)]
        values: Option<PathBuf>,
        /// Accepted for scripts; the lab is always a real cluster.
        #[arg(long, hide = true)]
        kubernetes: bool,
    },
    /// The first run: a two-node cluster, the pods of `--manifests` probed pair by pair, its
    /// `policy/` applied and deleted, its Service probed from a pod and from outside, the
    /// datapath's counters. Exit 1 when a step did not go the way it says.
    Demo {
        /// examples/demo, or a copy of it: the checks name its pods, policy and Service.
        #[arg(long, default_value = "examples/demo")]
        manifests: PathBuf,
        #[arg(long)]
        json: PathBuf,
    },
    /// Bring a cluster up and keep it until Ctrl-C or `sluice-lab down`; reach it with
    /// `kubectl --kubeconfig $(sluice-lab kubeconfig)`.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long, default_value = "vxlan")]
        encap: String,
        #[arg(long, value_delimiter = ',', default_value = "80,81")]
        ports: Vec<u16>,
        /// A values file for the chart (deploy/chart/sluice), after the lab's own.
        #[arg(long)]
        values: Option<PathBuf>,
        /// Accepted for scripts; the lab is always a real cluster.
        #[arg(long, hide = true)]
        kubernetes: bool,
    },
    /// The path of the running cluster's admin kubeconfig, for kubectl and helm on this
    /// machine.
    Kubeconfig,
    /// Apply a manifest file to the running cluster.
    Apply {
        #[arg(short = 'f')]
        file: PathBuf,
    },
    /// Nodes, pods and Services of the running cluster.
    Status,
    /// Stop the running cluster.
    Down,
    /// Probe a Service of the running cluster: which endpoint answered each probe and the client
    /// address it saw.
    ProbeService(ProbeArgs),
    /// Bring up a real Kubernetes cluster with Sluice installed by its chart, run the upstream
    /// e2e suites against it (the release's e2e.test), print and write the results, tear down.
    /// Exit 1 when a spec failed.
    Conformance {
        /// Suites: netpol ([sig-network] Netpol), services ([sig-network] Services), cyclonus
        /// (Cyclonus's generated NetworkPolicy cases).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "netpol,services,cyclonus"
        )]
        suites: Vec<String>,
        /// Only the specs whose name contains this; for cyclonus, the case tags to run
        /// (comma-separated; default upstream-e2e,conflict).
        #[arg(long)]
        only: Option<String>,
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Where the results go (JSON); Ginkgo's reports and logs go beside it.
        #[arg(long, default_value = "target/conformance/results.json")]
        json: PathBuf,
    },
}

/// `probe-service`'s arguments, and the request the running lab gets.
#[derive(clap::Args, Serialize, Deserialize)]
struct ProbeArgs {
    /// The Service, as namespace/name.
    service: String,
    /// The Service port [default: the Service's first port of the protocol].
    #[arg(long)]
    port: Option<u16>,
    /// Probe over UDP instead of TCP.
    #[arg(long)]
    udp: bool,
    /// Where probes start: namespace/pod, a node name, or `external` (the external client)
    /// [default: the first running pod the Service does not select].
    #[arg(long)]
    from: Option<String>,
    /// Which address: cluster-ip, node-port, load-balancer or external-ip.
    #[arg(long, default_value = "cluster-ip")]
    frontend: String,
    /// The node whose address node-port probes go to; external-ip probes from the external
    /// client are routed through it.
    #[arg(long, default_value = "node-1")]
    node: String,
    /// How many probes, one after the other (each a new connection).
    #[arg(long, default_value_t = 10)]
    count: usize,
}

fn main() -> Result<()> {
    // Parsed first: `help` needs no root.
    let args = Args::parse();
    sluice_tests::require_root();
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let stop = stop.clone();
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            signal_hook_registry::register(signal, move || stop.store(true, Ordering::SeqCst))
        }?;
    }
    match args.command {
        Cmd::Matrix {
            nodes,
            manifests,
            ports,
            protocols,
            datapath,
            encap,
            json,
            values,
            expect_all_connected,
            kubernetes: _,
        } => {
            if datapath != "ebpf" {
                bail!("--datapath {datapath:?}: only ebpf is available yet");
            }
            let protocols = protocols
                .iter()
                .map(|p| Protocol::parse(p))
                .collect::<Result<Vec<_>>>()?;
            let options = cluster_options(nodes, &encap, values)?;
            guarded(&stop, || {
                let report = matrix(options, &manifests, &ports, &protocols, &json, &stop)?;
                if expect_all_connected {
                    let probes: Vec<_> = report.steps.into_iter().flat_map(|s| s.probes).collect();
                    expect(&probes, |_| true)?;
                }
                Ok(())
            })
        }
        Cmd::Demo { manifests, json } => guarded(&stop, || {
            let cluster = Cluster::up(ClusterOptions::nodes(2))?;
            let report = demo::run(&cluster, &manifests)?;
            std::fs::write(&json, serde_json::to_vec_pretty(&report)?)
                .with_context(|| format!("writing {}", json.display()))?;
            Ok(())
        }),
        Cmd::Up {
            nodes,
            encap,
            ports,
            values,
            kubernetes: _,
        } => {
            let options = cluster_options(nodes, &encap, values)?;
            guarded(&stop, || up(options, &ports, &stop))
        }
        Cmd::Kubeconfig => {
            let path = Path::new(STATE_DIR).join("kubeconfig");
            if !path.exists() {
                bail!("no running lab (start one with `sluice-lab up`)");
            }
            println!("{}", path.display());
            Ok(())
        }
        Cmd::Apply { file } => apply(&file),
        Cmd::Status => {
            if !Path::new(STATE_DIR).join("kubeconfig").exists() {
                bail!("no running lab (start one with `sluice-lab up`)");
            }
            print!(
                "{}",
                kubectl(&["get", "nodes,pods,services", "-A", "-o", "wide"])?
            );
            Ok(())
        }
        Cmd::Down => down(),
        Cmd::Conformance {
            suites,
            only,
            nodes,
            json,
        } => guarded(&stop, || {
            conformance(&suites, only.as_deref(), nodes, &json)
        }),
        Cmd::ProbeService(args) => {
            // Each probe waits at most 1 s to connect and 1 s for the answer.
            let timeout = Duration::from_secs(30 + 2 * args.count as u64);
            print!("{}", ask("probe", &serde_json::to_vec(&args)?, timeout)?);
            Ok(())
        }
    }
}

fn conformance(suites: &[String], only: Option<&str>, nodes: usize, json: &Path) -> Result<()> {
    // Every name checked before a cluster comes up.
    for name in suites.iter().filter(|s| *s != "cyclonus") {
        conformance::suite(name)?;
    }
    let cluster = Cluster::up(ClusterOptions::nodes(nodes))?;
    let out = json.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut results = Vec::new();
    for name in suites {
        eprintln!("running {name} ...");
        let result = if name == "cyclonus" {
            let tags: Vec<&str> = match only {
                Some(tags) => tags.split(',').collect(),
                None => cyclonus::DEFAULT_TAGS.to_vec(),
            };
            // The default tags take about 25 minutes here.
            cyclonus::run(&cluster, &tags, &out, Duration::from_secs(90 * 60))?
        } else {
            let only: Vec<&str> = only.into_iter().collect();
            conformance::run(&cluster, conformance::suite(name)?, &only, &out)?
        };
        print!("{}", result.summary());
        results.push(result);
    }
    std::fs::write(
        json,
        serde_json::to_vec_pretty(&serde_json::json!({
            "sluice": env!("CARGO_PKG_VERSION"),
            "kubernetes": cluster.server_version()?,
            "nodes": nodes,
            "startupSeconds": cluster.startup.as_secs_f64(),
            "suites": results,
        }))?,
    )?;
    let failed: usize = results.iter().map(|r| r.failed).sum();
    if failed > 0 {
        bail!(
            "{failed} conformance specs failed (details in {})",
            json.display()
        );
    }
    Ok(())
}

/// Runs `f`; a signal while it runs removes everything the lab created and exits 130.
fn guarded(stop: &Arc<AtomicBool>, f: impl FnOnce() -> Result<()> + Send) -> Result<()> {
    std::thread::scope(|scope| {
        let worker = scope.spawn(f);
        while !worker.is_finished() {
            if stop.load(Ordering::SeqCst) {
                eprintln!("interrupted: tearing the lab down");
                sluice_tests::emergency_cleanup();
                let _ = std::fs::remove_dir_all(STATE_DIR);
                std::process::exit(130);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        worker.join().expect("lab thread panicked")
    })
}

/// The cluster `--nodes`, `--encap` and `--values` ask for.
fn cluster_options(nodes: usize, encap: &str, values: Option<PathBuf>) -> Result<ClusterOptions> {
    Ok(ClusterOptions {
        values,
        ..ClusterOptions::nodes(nodes)
    }
    .with_encap(Encap::parse(encap)?))
}

/// Brings the cluster up, applies each manifest directory in turn, waits until the agents hold
/// it and probes every pair; writes the report.
fn matrix(
    options: ClusterOptions,
    dirs: &[PathBuf],
    ports: &[u16],
    protocols: &[Protocol],
    json: &Path,
    stop: &AtomicBool,
) -> Result<Report> {
    let started = Instant::now();
    let cluster = Cluster::up(options)?;
    println!("cluster up in {:.1?}", started.elapsed());
    let mut report = Report::default();
    for dir in dirs {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        cluster.apply_lab_manifests(manifests::load_dir(dir)?, ports)?;
        cluster.wait_programmed(Duration::from_secs(60))?;
        let probes = cluster.probe_all(ports, protocols, PROBE_TIMEOUT)?;
        let connected = probes.iter().filter(|p| p.connected).count();
        println!(
            "\n== {} ({connected}/{} probes connected)",
            dir.display(),
            probes.len()
        );
        println!("{}", index_legend(&probes));
        print!("{}", truth_table(&probes));
        report.steps.push(Step {
            manifests: dir.display().to_string(),
            probes,
        });
    }
    std::fs::write(json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    println!("\nreport: {}", json.display());
    Ok(report)
}

fn index_legend(probes: &[sluice_tests::lab::report::Probe]) -> String {
    let mut pods: Vec<&str> = probes.iter().map(|p| p.from.as_str()).collect();
    pods.sort();
    pods.dedup();
    pods.iter()
        .enumerate()
        .map(|(i, p)| format!("{i}={p}"))
        .collect::<Vec<_>>()
        .join("  ")
}

/// Claims the lab's control directory for this process, or fails naming the running lab.
fn claim_state_dir() -> Result<&'static Path> {
    let state = Path::new(STATE_DIR);
    if state.join("pid").exists() {
        bail!(
            "a lab is already running (pid in {}); `sluice-lab down` first",
            state.join("pid").display()
        );
    }
    std::fs::create_dir_all(state)?;
    std::fs::write(state.join("pid"), std::process::id().to_string())?;
    Ok(state)
}

fn up(options: ClusterOptions, ports: &[u16], stop: &AtomicBool) -> Result<()> {
    let state = claim_state_dir()?;
    let result = (|| {
        let nodes = options.nodes;
        let cluster = Cluster::up(options)?;
        let (_proxy, kubeconfig) = cluster.host_access()?;
        let requests = state.join("requests");
        std::fs::create_dir_all(&requests)?;
        let path = state.join("kubeconfig");
        std::fs::write(&path, kubeconfig)?;
        println!(
            "cluster up in {:.1} s: {nodes} nodes Ready, Sluice running ({})\n  \
             kubectl --kubeconfig {} get pods -A\n  \
             sluice-lab apply -f FILE | status | probe-service NS/NAME\n\
             stop with Ctrl-C or `sluice-lab down`",
            cluster.startup.as_secs_f64(),
            cluster.server_version()?,
            path.display()
        );
        while !stop.load(Ordering::SeqCst) {
            // Manifests are applied here, where the lab's ports are known: pods run the pod
            // server on them.
            serve_requests(&requests, |kind, request| match kind {
                "yaml" => Some(
                    manifests::load_file(request)
                        .and_then(|objects| cluster.apply_lab_manifests(objects, ports))
                        .map(|()| String::new()),
                ),
                "probe" => Some(probe_request(&cluster, request)),
                _ => None,
            })?;
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(state);
    result
}

/// kubectl on this machine against the running `up --kubernetes` cluster.
fn kubectl(args: &[&str]) -> Result<String> {
    sluice_tests::sh(
        std::process::Command::new(sluice_tests::cluster::kube_bin("kubectl"))
            .arg("--kubeconfig")
            .arg(Path::new(STATE_DIR).join("kubeconfig"))
            .args(args),
    )
}

/// Answers each request in `requests` that `handle` takes (by its extension), leaving files
/// being written or read alone.
fn serve_requests(
    requests: &Path,
    mut handle: impl FnMut(&str, &Path) -> Option<Result<String>>,
) -> Result<()> {
    for request in std::fs::read_dir(requests)?.filter_map(|e| e.ok().map(|e| e.path())) {
        let kind = request.extension().and_then(|e| e.to_str()).unwrap_or("");
        let Some(outcome) = handle(kind, &request) else {
            continue;
        };
        let answer = outcome.unwrap_or_else(|e| format!("error: {e:#}"));
        // Renamed into place: the requester reads the answer once it exists.
        let written = request.with_extension("answer");
        std::fs::write(&written, answer)?;
        std::fs::rename(&written, request.with_extension("done"))?;
        std::fs::remove_file(&request)?;
    }
    Ok(())
}

fn probe_request(lab: &impl ServiceProbes, request: &Path) -> Result<String> {
    let args: ProbeArgs = serde_json::from_slice(&std::fs::read(request)?)?;
    probe_service(lab, &args)
}

/// Runs `probe-service` in the `up` process.
fn probe_service(lab: &impl ServiceProbes, args: &ProbeArgs) -> Result<String> {
    let (ns, name) = args
        .service
        .split_once('/')
        .context("the Service is namespace/name")?;
    let request = ServiceProbe {
        port: args.port,
        protocol: if args.udp {
            Protocol::Udp
        } else {
            Protocol::Tcp
        },
        from: args.from.as_deref().map(str::parse).transpose()?,
        frontend: Frontend::parse(&args.frontend, &args.node)?,
        via: args.node.clone(),
        count: args.count,
    };
    Ok(request.run(lab, ns, name)?.text)
}

fn apply(file: &Path) -> Result<()> {
    manifests::load_file(file)?;
    let manifest = std::fs::read(file)?;
    ask("yaml", &manifest, Duration::from_secs(60))
        .with_context(|| format!("applying {}", file.display()))?;
    println!("applied {}", file.display());
    Ok(())
}

/// Hands a request to the running `up` and returns its answer.
fn ask(kind: &str, body: &[u8], timeout: Duration) -> Result<String> {
    let spool = Path::new(STATE_DIR).join("requests");
    if !spool.is_dir() {
        bail!("no running lab (start one with `sluice-lab up`)");
    }
    let request = spool.join(format!("{}.{kind}", std::process::id()));
    // Renamed into place: the lab reads a request once it exists.
    std::fs::write(request.with_extension("tmp"), body)?;
    std::fs::rename(request.with_extension("tmp"), &request)?;
    let done = request.with_extension("done");
    let deadline = Instant::now() + timeout;
    while !done.exists() {
        if Instant::now() > deadline {
            let _ = std::fs::remove_file(&request);
            bail!("the running lab did not answer within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let answer = std::fs::read_to_string(&done)?;
    let _ = std::fs::remove_file(&done);
    match answer.strip_prefix("error: ") {
        Some(e) => bail!("{e}"),
        None => Ok(answer),
    }
}

fn down() -> Result<()> {
    let pid: i32 = std::fs::read_to_string(Path::new(STATE_DIR).join("pid"))
        .context("no running lab")?
        .trim()
        .parse()?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new(STATE_DIR).join("pid").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("lab down");
    Ok(())
}
