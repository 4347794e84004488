//! Masquerade: pod traffic leaving the pod CIDR (other than towards the pods themselves) leaves
//! with the node's address; and the node's own traffic to a Service that a process sent from one
//! of the node's addresses leaves the gateway with the gateway's.
//! One nftables table, `ip sluice`, replaced atomically as a whole.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use ipnetwork::IpNetwork;

pub const TABLE: &str = "sluice";

/// `cluster`: every pod CIDR of the cluster; traffic between pods keeps its source address.
/// `pods`: whether pod traffic is masqueraded (Antrea's `noSNAT` off).
///
/// The gateway rule is there whatever `pods` says: a Service's endpoint may be on another node,
/// where in encap mode its reply to a node address would cross that node's stack, which knows no
/// connection of it and masquerades it; from the gateway's address, the reply comes back through
/// the tunnel and is un-NATed here. Only what the node itself sends (`fib saddr type local`),
/// never what it forwards; and not to pods, which keep seeing the node's address as the client
/// (kube-proxy's short-circuit of a node reaching its own NodePort keeps it too): their answers
/// follow the connection back through the tunnel (TUNNEL_REPLIES).
pub fn ruleset(pod_cidr: IpNetwork, cluster: &[IpNetwork], gateway: &str, pods: bool) -> String {
    let mut pod_cidrs: Vec<String> = cluster.iter().map(|c| c.to_string()).collect();
    if !cluster.contains(&pod_cidr) {
        pod_cidrs.push(pod_cidr.to_string());
    }
    let pods_set = pod_cidrs.join(", ");
    let pod_rule = if pods {
        format!(
            "\x20   ip saddr {pod_cidr} ip daddr != {{ {pods_set} }} oifname != \"{gateway}\" masquerade\n"
        )
    } else {
        String::new()
    };
    // `add` then `delete` makes the replace work whether or not the table exists.
    format!(
        "add table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \x20 chain postrouting {{\n\
         \x20   type nat hook postrouting priority srcnat; policy accept;\n\
         {pod_rule}\
         \x20   oifname \"{gateway}\" ip saddr != {pod_cidr} fib saddr type local ip daddr != {{ {pods_set} }} masquerade\n\
         \x20 }}\n\
         }}\n"
    )
}

/// Installs the table in the agent's network namespace with `nft -f -`.
pub fn install(
    pod_cidr: IpNetwork,
    cluster: &[IpNetwork],
    gateway: &str,
    pods: bool,
) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (is the nftables package installed?)")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(ruleset(pod_cidr, cluster, gateway, pods).as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft rejected the masquerade table: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    fn node_rule(pods: &str) -> String {
        format!(
            "oifname \"sluice-gw0\" ip saddr != 10.244.0.0/24 fib saddr type local \
             ip daddr != {{ {pods} }} masquerade"
        )
    }

    #[test]
    fn ruleset_masquerades_only_traffic_leaving_the_pod_cidr() {
        let own = "10.244.0.0/24".parse().unwrap();
        let text = super::ruleset(own, &["10.244.1.0/24".parse().unwrap()], "sluice-gw0", true);
        assert!(
            text.contains(
                "ip saddr 10.244.0.0/24 ip daddr != { 10.244.1.0/24, 10.244.0.0/24 } oifname != \"sluice-gw0\" masquerade"
            ),
            "{text}"
        );
        // The node's own traffic to any pod keeps its address.
        assert!(
            text.contains(&node_rule("10.244.1.0/24, 10.244.0.0/24")),
            "{text}"
        );
    }

    #[test]
    fn without_pod_masquerade_only_the_nodes_own_traffic_through_the_gateway_is() {
        let own = "10.244.0.0/24".parse().unwrap();
        let text = super::ruleset(own, &[], "sluice-gw0", false);
        assert!(!text.contains("oifname != "), "{text}");
        assert!(text.contains(&node_rule("10.244.0.0/24")), "{text}");
    }
}
