//! New connections per second through a ClusterIP in real network namespaces: Sluice on a
//! one-node cluster against kube-proxy's rules (`kube_proxy.rs`), rounds interleaved.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use sluice_agent::datapath::ebpf::Maps;
use sluice_common::FlowKey;
use sluice_tests::in_netns;

use super::{
    allocated_ip, create, kube_proxy::KubeProxy, Scale, ENDPOINTS_PER_SERVICE, FIRST_PORT,
    SERVICE_PORT,
};
use crate::{
    agent_process::wait_reported,
    policy::{median, one_node, with_acceptor},
};

const CONNECT_TIME: Duration = Duration::from_secs(1);

/// Connections per second through a ClusterIP with each count of Services installed, Sluice
/// (one cluster node, client and server pods) against kube-proxy's rules (`KubeProxy`), rounds
/// interleaved.
pub fn run(scale: &Scale) -> Result<()> {
    let kube_proxy = KubeProxy::up(scale)?;
    let (cluster, admin) = one_node(&["client", "server"])?;
    let pods = cluster.pod_addresses(Some("default"))?;
    let (client_ns, client_ip) = pods.get("client").context("client pod")?.clone();
    let (server_ns, server_ip) = pods.get("server").context("server pod")?.clone();
    let mut maps = cluster.nodes[0].maps()?;
    // The cluster's own Services (kubernetes, kube-dns) are there before the benchmark's.
    let system = maps.service_entries()?.0.len();

    println!(
        "\nnew connections per second through a ClusterIP (connect/close loop, fresh source port per connection, median of {} interleaved rounds of {} s after a warm-up round)",
        scale.rate_rounds,
        CONNECT_TIME.as_secs()
    );
    println!(
        "kube-proxy baseline: {} (iptables-restore, nat table, mode iptables)",
        kube_proxy.version()?
    );
    println!("| Services × {ENDPOINTS_PER_SERVICE} endpoints | Sluice conn/s | iptables conn/s | Sluice vs iptables | iptables-restore of the rules |");
    println!("|---|---|---|---|---|");
    let mut installed = 0;
    for (c, &n) in scale.counts.iter().enumerate() {
        let written = create(&admin, installed..n, &[server_ip])?;
        installed = n;
        let vip = SocketAddrV4::new(allocated_ip(&admin, 0)?, SERVICE_PORT);
        wait_reported(&cluster.nodes[0], &written)?;
        ensure!(
            maps.service_entries()?.0.len() == system + n as usize,
            "SERVICES does not hold {n} frontends besides the cluster's {system}"
        );
        let restore = kube_proxy.install(n)?;
        let (mut sluice, mut iptables) = (Vec::new(), Vec::new());
        for round in 0..=scale.rate_rounds {
            forget_connections(&mut maps)?;
            let s = with_acceptor(&client_ns, &server_ns, server_ip, || {
                connect_loop(&client_ns, client_ip, vip)
            });
            let i = kube_proxy.rate(c * (scale.rate_rounds + 1) + round);
            // Round 0 warms up: the first connections of a path pay for neighbour entries and
            // socket caches.
            if round > 0 {
                sluice.push(s);
                iptables.push(i);
            }
        }
        let (sluice, iptables) = (median(sluice), median(iptables));
        println!(
            "| {n} | {sluice:.0} | {iptables:.0} | {:.2} | {:.1} s |",
            sluice / iptables,
            restore.as_secs_f64()
        );
    }
    Ok(())
}

/// Empties SERVICE_NAT before a round. Its entries stay until the LRU needs room or their
/// endpoint goes away, so a source port reused from an earlier round would find its old entry
/// and skip the frontend lookup, pick and insert that a new connection pays.
fn forget_connections(maps: &mut Maps) -> Result<()> {
    let keys: Vec<FlowKey> = maps.service_nat.keys().collect::<Result<_, _>>()?;
    for key in &keys {
        maps.service_nat.remove(key)?;
    }
    Ok(())
}

/// Connections per second from `src` to `dst` over one round, each from a source port of its
/// own, closed with a reset so that no TIME_WAIT holds the port.
pub fn connect_loop(client: &Path, src: Ipv4Addr, dst: SocketAddrV4) -> f64 {
    in_netns(client, move || {
        let start = Instant::now();
        let (mut n, mut failed) = (0u64, 0u64);
        for port in FIRST_PORT..=u16::MAX {
            if start.elapsed() >= CONNECT_TIME {
                break;
            }
            match connect_from(SocketAddrV4::new(src, port), dst) {
                Ok(_) => n += 1,
                Err(_) => failed += 1,
            }
        }
        if failed > 0 {
            eprintln!("  ({failed} connects failed)");
        }
        n as f64 / start.elapsed().as_secs_f64()
    })
}

fn connect_from(src: SocketAddrV4, dst: SocketAddrV4) -> nix::Result<OwnedFd> {
    use nix::sys::{
        socket::{
            bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType,
            SockaddrIn,
        },
        time::{TimeVal, TimeValLike},
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // Bounds the blocking connect: a lost SYN costs 200 ms, not a minute of retransmissions.
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::milliseconds(200))?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(src))?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(dst))?;
    let reset = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(&fd, sockopt::Linger, &reset)?;
    Ok(fd)
}
