//! sluice-lab: a Sluice cluster on one machine (network namespaces, real agents, an embedded
//! Kubernetes API server). Scripts depend on this command line; keep it stable.
//!
//!   sluice-lab matrix --nodes N --manifests DIR [--manifests DIR2 ...] [--ports 80,81]
//!       [--protocols TCP,UDP] [--datapath ebpf] [--encap vxlan|noencap] --json OUT.json
//!   sluice-lab up [--nodes N] [--encap vxlan|noencap]   (foreground; Ctrl-C or `down` ends it)
//!   sluice-lab apply -f FILE | status | down

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
use sluice_tests::lab::{
    manifests,
    report::{probe_all, truth_table, Protocol, Report, Step},
    Encap, Lab, LabOptions,
};

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
    },
    /// Bring a cluster up and keep it until Ctrl-C or `sluice-lab down`.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long, default_value = "vxlan")]
        encap: String,
        #[arg(long, value_delimiter = ',', default_value = "80,81")]
        ports: Vec<u16>,
    },
    /// Apply a manifest file to the running cluster.
    Apply {
        #[arg(short = 'f')]
        file: PathBuf,
    },
    /// Nodes and pods of the running cluster.
    Status,
    /// Stop the running cluster.
    Down,
}

fn main() -> Result<()> {
    sluice_tests::require_root();
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let stop = stop.clone();
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            signal_hook_registry::register(signal, move || stop.store(true, Ordering::SeqCst))
        }?;
    }
    match Args::parse().command {
        Cmd::Matrix {
            nodes,
            manifests,
            ports,
            protocols,
            datapath,
            encap,
            json,
        } => {
            if datapath != "ebpf" {
                bail!("--datapath {datapath:?}: only ebpf is available yet");
            }
            let protocols = protocols
                .iter()
                .map(|p| Protocol::parse(p))
                .collect::<Result<Vec<_>>>()?;
            let options = LabOptions {
                nodes,
                encap: Encap::parse(&encap)?,
                attach_mode: "auto".into(),
                ports: ports.clone(),
            };
            guarded(&stop, || {
                matrix(options, &manifests, &ports, &protocols, &json, &stop)
            })
        }
        Cmd::Up {
            nodes,
            encap,
            ports,
        } => {
            let options = LabOptions {
                nodes,
                encap: Encap::parse(&encap)?,
                attach_mode: "auto".into(),
                ports,
            };
            guarded(&stop, || up(options, &stop))
        }
        Cmd::Apply { file } => apply(&file),
        Cmd::Status => {
            let status = std::fs::read_to_string(Path::new(STATE_DIR).join("status.txt"))
                .context("no running lab (start one with `sluice-lab up`)")?;
            print!("{status}");
            Ok(())
        }
        Cmd::Down => down(),
    }
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

fn matrix(
    options: LabOptions,
    dirs: &[PathBuf],
    ports: &[u16],
    protocols: &[Protocol],
    json: &Path,
    stop: &AtomicBool,
) -> Result<()> {
    let started = Instant::now();
    let mut lab = Lab::up(options)?;
    println!(
        "cluster up: {} nodes in {:.1?}",
        lab.nodes.len(),
        started.elapsed()
    );
    let mut report = Report::default();
    for dir in dirs {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        lab.apply(manifests::load_dir(dir)?)?;
        lab.wait_programmed(Duration::from_secs(30))?;
        let probes = probe_all(&lab, ports, protocols);
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
    Ok(())
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

fn up(options: LabOptions, stop: &AtomicBool) -> Result<()> {
    let state = Path::new(STATE_DIR);
    if state.join("pid").exists() {
        bail!(
            "a lab is already running (pid in {}); `sluice-lab down` first",
            state.join("pid").display()
        );
    }
    std::fs::create_dir_all(state.join("apply"))?;
    std::fs::write(state.join("pid"), std::process::id().to_string())?;
    let result = (|| {
        let mut lab = Lab::up(options)?;
        println!(
            "lab up: {} nodes; kubeconfig {} (API server inside the lab namespace {})",
            lab.nodes.len(),
            lab.kubeconfig_path().display(),
            lab.switch.name
        );
        println!("apply manifests with `sluice-lab apply -f FILE`, stop with Ctrl-C or `sluice-lab down`");
        while !stop.load(Ordering::SeqCst) {
            for request in
                std::fs::read_dir(state.join("apply"))?.filter_map(|e| e.ok().map(|e| e.path()))
            {
                if request.extension().is_some_and(|e| e == "yaml") {
                    let outcome =
                        manifests::load_file(&request).and_then(|objects| lab.apply(objects));
                    let answer = match outcome {
                        Ok(()) => "ok".to_string(),
                        Err(e) => format!("error: {e:#}"),
                    };
                    std::fs::write(request.with_extension("done"), answer)?;
                    std::fs::remove_file(&request)?;
                }
            }
            lab.sync()?;
            std::fs::write(state.join("status.txt"), status_text(&lab))?;
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(state);
    result
}

fn status_text(lab: &Lab) -> String {
    let mut out = String::from("NODE       INTERNAL-IP     POD-CIDR         READY\n");
    let ready = lab.agents_ready();
    for n in &lab.nodes {
        out.push_str(&format!(
            "{:<10} {:<15} {:<16} {}\n",
            n.name, n.ip, n.pod_cidr, ready
        ));
    }
    out.push_str("\nPOD                            IP\n");
    for (pod, ip) in lab.pod_ips() {
        out.push_str(&format!("{pod:<30} {ip}\n"));
    }
    out
}

fn apply(file: &Path) -> Result<()> {
    manifests::load_file(file)?;
    let spool = Path::new(STATE_DIR).join("apply");
    if !spool.is_dir() {
        bail!("no running lab (start one with `sluice-lab up`)");
    }
    let request = spool.join(format!("{}.yaml", std::process::id()));
    std::fs::copy(file, request.with_extension("tmp"))?;
    std::fs::rename(request.with_extension("tmp"), &request)?;
    let done = request.with_extension("done");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done.exists() {
        if Instant::now() > deadline {
            bail!(
                "the running lab did not take {} within 60 s",
                file.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let answer = std::fs::read_to_string(&done)?;
    let _ = std::fs::remove_file(&done);
    match answer.strip_prefix("error: ") {
        Some(e) => bail!("{e}"),
        None => {
            println!("applied {}", file.display());
            Ok(())
        }
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
