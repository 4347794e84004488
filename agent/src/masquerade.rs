//! Masquerade: pod traffic leaving the pod CIDR (other than towards the pods themselves) leaves
//! with the node's address. One nftables table, `ip sluice`, replaced atomically as a whole.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use ipnetwork::IpNetwork;

pub const TABLE: &str = "sluice";

/// `cluster`: every pod CIDR of the cluster; traffic between pods keeps its source address.
pub fn ruleset(pod_cidr: IpNetwork, cluster: &[IpNetwork], gateway: &str) -> String {
    let mut pods: Vec<String> = cluster.iter().map(|c| c.to_string()).collect();
    if !cluster.contains(&pod_cidr) {
        pods.push(pod_cidr.to_string());
    }
    let pods = pods.join(", ");
    // `add` then `delete` makes the replace work whether or not the table exists.
    format!(
        "add table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \x20 chain postrouting {{\n\
         \x20   type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   ip saddr {pod_cidr} ip daddr != {{ {pods} }} oifname != \"{gateway}\" masquerade\n\
         \x20 }}\n\
         }}\n"
    )
}

/// Installs the table in the agent's network namespace with `nft -f -`.
pub fn install(pod_cidr: IpNetwork, cluster: &[IpNetwork], gateway: &str) -> Result<()> {
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
        .write_all(ruleset(pod_cidr, cluster, gateway).as_bytes())?;
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
    #[test]
    fn ruleset_masquerades_only_traffic_leaving_the_pod_cidr() {
        let own = "10.244.0.0/24".parse().unwrap();
        let text = super::ruleset(own, &["10.244.1.0/24".parse().unwrap()], "sluice-gw0");
        assert!(
            text.contains(
                "ip saddr 10.244.0.0/24 ip daddr != { 10.244.1.0/24, 10.244.0.0/24 } oifname != \"sluice-gw0\" masquerade"
            ),
            "{text}"
        );
    }
}
