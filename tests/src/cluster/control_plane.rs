//! The control plane, in the lab namespace: etcd on its loopback, kube-apiserver on the switch
//! address with client-certificate and service-account-token authentication and Node,RBAC
//! authorization (so Sluice's ClusterRoles are what lets it act), kube-controller-manager with
//! service-account credentials per controller and no node CIDR allocation unless asked (NodeIPAM
//! is Sluice's), kube-scheduler.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::Result;
use nix::sched::CloneFlags;

use super::{daemon::Daemon, kube_bin, pki::Pki, pki::Subject, API_URL};
use crate::{lab::SWITCH_IP, Netns};

/// Fields drop in this order: the scheduler and controller manager before the API server, the
/// API server before etcd.
pub struct ControlPlane {
    pub scheduler: Daemon,
    pub controller_manager: Daemon,
    pub apiserver: Daemon,
    pub etcd: Daemon,
}

/// What the controller manager does beyond its defaults.
#[derive(Clone, Debug, Default)]
pub struct ControllerManager {
    /// `--allocate-node-cidrs --cluster-cidr`: kube-controller-manager's NodeIPAM, as kubeadm's
    /// `--pod-network-cidr` turns on.
    pub cluster_cidr: Option<String>,
    /// Flags besides the lab's (the scale benchmark's grace periods: its API-only Nodes have no
    /// kubelet, and must not be marked unreachable, their pods not ready, while it runs).
    pub args: Vec<&'static str>,
}

impl ControlPlane {
    pub fn start(
        dir: &Path,
        pki: &Pki,
        switch: &Netns,
        service_cidr: &str,
        kcm: &ControllerManager,
    ) -> Result<ControlPlane> {
        for (file, group, name) in [
            ("admin", Some("system:masters"), "sluice-lab-admin"),
            ("controller-manager", None, "system:kube-controller-manager"),
            ("scheduler", None, "system:kube-scheduler"),
            // For logs, exec and port-forward through the kubelets.
            (
                "apiserver-kubelet-client",
                Some("system:masters"),
                "kube-apiserver-kubelet-client",
            ),
        ] {
            pki.issue(&Subject {
                file,
                group,
                name,
                usage: "clientAuth",
                alt_names: "",
            })?;
            std::fs::write(
                dir.join(format!("{file}.kubeconfig")),
                pki.kubeconfig(API_URL, file),
            )?;
        }
        let service_ip = first_address(service_cidr)?;
        pki.issue(&Subject {
            file: "apiserver",
            group: None,
            name: "kube-apiserver",
            usage: "serverAuth",
            alt_names: &format!(
                "IP:{SWITCH_IP},IP:{service_ip},IP:127.0.0.1,DNS:localhost,DNS:kubernetes,\
                 DNS:kubernetes.default,DNS:kubernetes.default.svc,\
                 DNS:kubernetes.default.svc.cluster.local"
            ),
        })?;
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let netns = || -> Result<Vec<(PathBuf, CloneFlags)>> {
            Ok(vec![(switch.path(), CloneFlags::CLONE_NEWNET)])
        };
        let p = |file: &str| pki.path(file).display().to_string();

        let mut etcd = Command::new(kube_bin("etcd"));
        etcd.arg("--data-dir")
            .arg(dir.join("etcd"))
            .args(["--name", "lab", "--log-level", "warn"])
            .args(["--listen-client-urls", "http://127.0.0.1:2379"])
            .args(["--advertise-client-urls", "http://127.0.0.1:2379"])
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "lab=http://127.0.0.1:2380"]);
        let etcd = Daemon::spawn("etcd", etcd, netns()?, logs.join("etcd.log"))?;

        let mut apiserver = Command::new(kube_bin("kube-apiserver"));
        apiserver
            .args(["--etcd-servers", "http://127.0.0.1:2379"])
            .args([
                "--bind-address",
                SWITCH_IP,
                "--advertise-address",
                SWITCH_IP,
            ])
            .args(["--secure-port", "6443"])
            .args(["--service-cluster-ip-range", service_cidr])
            .args(["--client-ca-file", &p("ca.crt")])
            .args(["--tls-cert-file", &p("apiserver.crt")])
            .args(["--tls-private-key-file", &p("apiserver.key")])
            .args([
                "--kubelet-client-certificate",
                &p("apiserver-kubelet-client.crt"),
            ])
            .args(["--kubelet-client-key", &p("apiserver-kubelet-client.key")])
            .args(["--kubelet-preferred-address-types", "InternalIP"])
            .args([
                "--service-account-issuer",
                "https://kubernetes.default.svc.cluster.local",
            ])
            .args(["--service-account-key-file", &p("service-account.pub")])
            .args([
                "--service-account-signing-key-file",
                &p("service-account.key"),
            ])
            .args(["--authorization-mode", "Node,RBAC"])
            .args(["--enable-admission-plugins", "NodeRestriction"])
            .args(["--allow-privileged", "--profiling=false"]);
        let mut apiserver = Daemon::spawn(
            "kube-apiserver",
            apiserver,
            netns()?,
            logs.join("kube-apiserver.log"),
        )?;
        let admin = dir.join("admin.kubeconfig");
        apiserver.wait_until(Duration::from_secs(60), || {
            kubectl_in(switch, &admin, &["get", "--raw", "/readyz"]).is_ok()
        })?;

        let kubeconfig = dir.join("controller-manager.kubeconfig");
        let mut controller_manager = Command::new(kube_bin("kube-controller-manager"));
        for flag in [
            "--kubeconfig",
            "--authentication-kubeconfig",
            "--authorization-kubeconfig",
        ] {
            controller_manager.arg(flag).arg(&kubeconfig);
        }
        controller_manager
            .args([
                "--service-account-private-key-file",
                &p("service-account.key"),
            ])
            .args(["--root-ca-file", &p("ca.crt")])
            .args(["--use-service-account-credentials", "--leader-elect=false"])
            .args(["--bind-address", "127.0.0.1", "--controllers", "*"])
            .args(&kcm.args)
            .args(["--service-cluster-ip-range", service_cidr]);
        match &kcm.cluster_cidr {
            Some(cidr) => {
                controller_manager.args(["--allocate-node-cidrs=true", "--cluster-cidr", cidr])
            }
            None => controller_manager.arg("--allocate-node-cidrs=false"),
        };
        let controller_manager = Daemon::spawn(
            "kube-controller-manager",
            controller_manager,
            netns()?,
            logs.join("kube-controller-manager.log"),
        )?;

        let kubeconfig = dir.join("scheduler.kubeconfig");
        let mut scheduler = Command::new(kube_bin("kube-scheduler"));
        for flag in [
            "--kubeconfig",
            "--authentication-kubeconfig",
            "--authorization-kubeconfig",
        ] {
            scheduler.arg(flag).arg(&kubeconfig);
        }
        scheduler.args(["--leader-elect=false", "--bind-address", "127.0.0.1"]);
        let scheduler = Daemon::spawn(
            "kube-scheduler",
            scheduler,
            netns()?,
            logs.join("kube-scheduler.log"),
        )?;
        Ok(ControlPlane {
            scheduler,
            controller_manager,
            apiserver,
            etcd,
        })
    }
}

/// The first address of a CIDR (the `kubernetes` Service's cluster IP).
fn first_address(cidr: &str) -> Result<std::net::IpAddr> {
    let net: ipnetwork::IpNetwork = cidr.parse()?;
    Ok(match net {
        ipnetwork::IpNetwork::V4(n) => std::net::IpAddr::V4((u32::from(n.network()) + 1).into()),
        ipnetwork::IpNetwork::V6(n) => std::net::IpAddr::V6((u128::from(n.network()) + 1).into()),
    })
}

/// `kubectl` from the lab namespace (where the API server's address is).
pub fn kubectl_in(switch: &Netns, kubeconfig: &Path, args: &[&str]) -> Result<String> {
    crate::sh(
        Command::new("ip")
            .args(["netns", "exec", &switch.name])
            .arg(kube_bin("kubectl"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args),
    )
}
