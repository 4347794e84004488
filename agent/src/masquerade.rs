//! Masquerade: pod traffic leaving the pod CIDR (other than towards the pods themselves) leaves
//! with the node's address. One nftables table, `ip sluice`, replaced atomically as a whole.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use ipnetwork::IpNetwork;

pub const TABLE: &str = "sluice";

pub fn ruleset(pod_cidr: IpNetwork, gateway: &str) -> String {
    // `add` then `delete` makes the replace work whether or not the table exists.
    format!(
        "add table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \x20 chain postrouting {{\n\
         \x20   type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   ip saddr {pod_cidr} ip daddr != {pod_cidr} oifname != \"{gateway}\" masquerade\n\
         \x20 }}\n\
         }}\n"
    )
}

/// Installs the table in the agent's network namespace with `nft -f -`.
pub fn install(pod_cidr: IpNetwork, gateway: &str) -> Result<()> {
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
        .write_all(ruleset(pod_cidr, gateway).as_bytes())?;
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
        let text = super::ruleset("10.244.0.0/24".parse().unwrap(), "sluice-gw0");
        assert!(text.contains(
            "ip saddr 10.244.0.0/24 ip daddr != 10.244.0.0/24 oifname != \"sluice-gw0\" masquerade"
        ));
    }
}
