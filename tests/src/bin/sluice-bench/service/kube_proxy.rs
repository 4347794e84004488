//! The baseline of `sluice-bench service`: kube-proxy's iptables mode, rebuilt in three network
//! namespaces (client, node, server) that stand where the lab's pods and node stand. The node
//! routes between the two and holds the nat table kube-proxy would write for the same Services.

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddrV4},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use sluice_tests::Netns;

use super::{cluster_ip, connection_rate::connect_loop, endpoints_of, Scale, SERVICE_PORT};
use crate::policy::{with_acceptor, ACCEPT_PORT};

/// The server, the one real endpoint of the measured Service.
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 89, 2, 2);
/// What kube-proxy's `--cluster-cidr` would be: traffic from elsewhere is masqueraded.
const CLUSTER_CIDR: &str = "10.89.0.0/16";
/// How long an iptables-restore may take before the benchmark gives up.
const RESTORE_LIMIT: Duration = Duration::from_secs(600);

pub struct KubeProxy {
    client: Netns,
    node: Netns,
    server: Netns,
}

/// The client's source address in round `round`: 10.89.1.10 onwards. nf_conntrack keeps a reset
/// connection's entry for 10 s, so a source port reused from an earlier round would meet it;
/// a fresh address per round makes every connection new to the node, as Sluice's rounds do.
fn client_ip(round: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 89, 1, 10)) + round as u32)
}

impl KubeProxy {
    /// The namespaces and links, with a client address for every round of `scale`.
    pub fn up(scale: &Scale) -> Result<KubeProxy> {
        let (client, node, server) = (
            Netns::new("slkc")?,
            Netns::new("slkn")?,
            Netns::new("slks")?,
        );
        for (port, peer, node_ip, peer_ip) in [
            ("c0", &client, "10.89.1.1/24", "10.89.1.2/24"),
            ("s0", &server, "10.89.2.1/24", "10.89.2.2/24"),
        ] {
            node.exec(&[
                "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns",
                &peer.name,
            ])?;
            node.exec(&["ip", "addr", "add", node_ip, "dev", port])?;
            node.exec(&["ip", "link", "set", port, "up"])?;
            peer.exec(&["ip", "addr", "add", peer_ip, "dev", "eth0"])?;
            peer.exec(&["ip", "link", "set", "eth0", "up"])?;
            let gateway = node_ip.split('/').next().unwrap_or_default();
            peer.exec(&["ip", "route", "add", "default", "via", gateway])?;
        }
        node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        for round in 0..scale.counts.len() * (scale.rate_rounds + 1) {
            let ip = format!("{}/24", client_ip(round));
            client.exec(&["ip", "addr", "add", &ip, "dev", "eth0"])?;
        }
        Ok(KubeProxy {
            client,
            node,
            server,
        })
    }

    /// Which iptables this is (legacy or nf_tables backend).
    pub fn version(&self) -> Result<String> {
        Ok(self.node.exec(&["iptables", "-V"])?.trim().to_string())
    }

    /// Replaces the node's nat table by kube-proxy's for `n` Services; the time iptables-restore
    /// took.
    pub fn install(&self, n: u32) -> Result<Duration> {
        let rules = rules(n);
        let start = Instant::now();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node.name, "iptables-restore"])
            .stdin(Stdio::piped())
            .spawn()
            .context("iptables-restore")?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(rules.as_bytes())?;
        loop {
            if let Some(status) = child.try_wait()? {
                anyhow::ensure!(status.success(), "iptables-restore failed: {status}");
                return Ok(start.elapsed());
            }
            if start.elapsed() > RESTORE_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                bail!("iptables-restore of {n} Services took over {RESTORE_LIMIT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Connections per second from the client to the measured Service in round `round`.
    pub fn rate(&self, round: usize) -> f64 {
        let client = self.client.path();
        let vip = SocketAddrV4::new(cluster_ip(0), SERVICE_PORT);
        with_acceptor(&client, &self.server.path(), SERVER_IP, || {
            connect_loop(&client, client_ip(round), vip)
        })
    }
}

/// kube-proxy's nat table for `n` Services (iptables mode, as `iptables-save` shows it, less
/// comments and NodePorts): KUBE-SERVICES matches each ClusterIP and jumps to the Service's
/// KUBE-SVC chain, which picks an endpoint with `statistic` rules (probability 1/remaining); the
/// endpoint's KUBE-SEP chain DNATs. The measured Service (0) sits in the middle of
/// KUBE-SERVICES: a new connection walks half the chain, the average.
fn rules(n: u32) -> String {
    let mut order: Vec<u32> = (1..n).collect();
    order.insert((n / 2).min(n - 1) as usize, 0);
    let mut chains = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
         :KUBE-POSTROUTING - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\n\
         -A POSTROUTING -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -j MASQUERADE\n",
    );
    for i in order {
        let vip = cluster_ip(i);
        let svc = format!("KUBE-SVC-{i}");
        let frontend = format!("-d {vip}/32 -p tcp -m tcp --dport {SERVICE_PORT}");
        chains.push_str(&format!(":{svc} - [0:0]\n"));
        rules.push_str(&format!("-A KUBE-SERVICES {frontend} -j {svc}\n"));
        rules.push_str(&format!(
            "-A {svc} ! -s {CLUSTER_CIDR} {frontend} -j KUBE-MARK-MASQ\n"
        ));
        let endpoints = endpoints_of(i, &[SERVER_IP]);
        let count = endpoints.len();
        for (j, endpoint) in endpoints.iter().enumerate() {
            let sep = format!("KUBE-SEP-{i}-{j}");
            chains.push_str(&format!(":{sep} - [0:0]\n"));
            if j + 1 < count {
                let probability = 1.0 / (count - j) as f64;
                rules.push_str(&format!(
                    "-A {svc} -m statistic --mode random --probability {probability:.10} -j {sep}\n"
                ));
            } else {
                rules.push_str(&format!("-A {svc} -j {sep}\n"));
            }
            rules.push_str(&format!("-A {sep} -s {endpoint}/32 -j KUBE-MARK-MASQ\n"));
            rules.push_str(&format!(
                "-A {sep} -p tcp -m tcp -j DNAT --to-destination {endpoint}:{ACCEPT_PORT}\n"
            ));
        }
    }
    chains + &rules + "COMMIT\n"
}
