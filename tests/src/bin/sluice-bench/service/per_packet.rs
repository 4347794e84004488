//! from_pod's per-packet cost through a ClusterIP (BPF_PROG_TEST_RUN), with the Service maps
//! filled by the agent's own compiler and `Maps::sync_services`, whose times are printed too.

use std::{net::Ipv4Addr, time::Instant};

use anyhow::{ensure, Context, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use k8s_openapi::api::core::v1::Service as K8sService;
use sluice_agent::k8s::EndpointSlice;
use sluice_agent::{
    datapath::ebpf::Maps,
    model::service::{self, ServiceInputs, SetAllocator},
};
use sluice_common::{Endpoint, IpKey};
use sluice_tests::test_run::{
    harness, ipv4_l4, Harness, Setup, GW_MAC, PEER_IFINDEX, PEER_MAC, PEER_V4, POD_V4,
    TC_ACT_REDIRECT,
};

use super::{cluster_ip, objects, Scale, ENDPOINTS_PER_SERVICE, FIRST_PORT, SERVICE_PORT};
use crate::policy::{median, ACCEPT_PORT};

const REPEAT: u32 = 1_000_000;
/// The source MAC of the client pod's frames: the gateway's. Output rewrites a forwarded frame's
/// source to the gateway's MAC, so a frame that already carries it leaves unchanged and a repeated
/// test run meets the same path every time; with any other MAC, every repeat after the first
/// would be SpoofGuard's drop. The lookups and comparisons are the same whatever the MAC.
const CLIENT_MAC: [u8; 6] = GW_MAC;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// The measured Service's endpoints in the test-run harness: pods on this node, so that every
/// pick takes the same path (Output into the pod) whichever endpoint it is.
fn local_endpoints() -> Vec<Ipv4Addr> {
    (10..10 + ENDPOINTS_PER_SERVICE as u8)
        .map(|last| Ipv4Addr::new(10, 244, 0, last))
        .collect()
}

/// Nanoseconds per packet, medians of single runs; `other_repeated` is from one run of REPEAT.
#[derive(Clone, Copy)]
struct PacketCosts {
    new: f64,
    established: f64,
    other: f64,
    other_repeated: f64,
}

impl PacketCosts {
    fn least(self, other: PacketCosts) -> PacketCosts {
        PacketCosts {
            new: self.new.min(other.new),
            established: self.established.min(other.established),
            other: self.other.min(other.other),
            other_repeated: self.other_repeated.min(other.other_repeated),
        }
    }
}

/// Seconds spent by the agent's compiler and by `Maps::sync_services`.
#[derive(Clone, Copy)]
struct SyncTimes {
    compile: f64,
    first: f64,
    unchanged: f64,
    with_nat: f64,
    nat_entries: usize,
}

impl SyncTimes {
    fn least(self, other: SyncTimes) -> SyncTimes {
        SyncTimes {
            compile: self.compile.min(other.compile),
            first: self.first.min(other.first),
            unchanged: self.unchanged.min(other.unchanged),
            with_nat: self.with_nat.min(other.with_nat),
            nat_entries: other.nat_entries,
        }
    }
}

/// from_pod's per-packet cost through a ClusterIP with `n` Services in SERVICES and BACKENDS,
/// filled by the agent's compiler and `Maps::sync_services` (timed too), in rounds that each
/// visit every count.
pub fn run(scale: &Scale) -> Result<()> {
    let mut best: Vec<Option<(PacketCosts, SyncTimes)>> = vec![None; scale.counts.len()];
    for _ in 0..scale.packet_rounds {
        for (slot, &n) in best.iter_mut().zip(scale.counts) {
            let (c, t) = packet_round(n, scale.samples)?;
            *slot = Some(match *slot {
                None => (c, t),
                Some((bc, bt)) => (bc.least(c), bt.least(t)),
            });
        }
    }
    let best: Vec<(u32, PacketCosts, SyncTimes)> = scale
        .counts
        .iter()
        .zip(best)
        .filter_map(|(&n, b)| b.map(|(c, t)| (n, c, t)))
        .collect();
    println!(
        "from_pod per-packet cost through a ClusterIP, BPF_PROG_TEST_RUN (ns/packet): median of {} single runs, least of {} rounds",
        scale.samples, scale.packet_rounds
    );
    println!("| Services × {ENDPOINTS_PER_SERVICE} endpoints | new connection (first packet) | established connection | non-Service destination | non-Service destination, {REPEAT} repeats |");
    println!("|---|---|---|---|---|");
    for (n, c, _) in &best {
        println!(
            "| {n} | {:.0} | {:.0} | {:.0} | {:.0} |",
            c.new, c.established, c.other, c.other_repeated
        );
    }
    if let (Some((first, a, _)), Some((last, b, _))) = (best.first(), best.last()) {
        println!(
            "{last} Services vs {first}: new connection {:.2}x, established {:.2}x, non-Service {:.2}x ({:.2}x repeated)",
            b.new / a.new,
            b.established / a.established,
            b.other / a.other,
            b.other_repeated / a.other_repeated
        );
    }
    println!("\nthe agent's Service compiler and Maps::sync_services on the harness maps (least of {} rounds)", scale.packet_rounds);
    println!("| Services × {ENDPOINTS_PER_SERVICE} endpoints | compile | first sync_services (empty maps) | unchanged re-sync | re-sync with SERVICE_NAT entries |");
    println!("|---|---|---|---|---|");
    for (n, _, t) in &best {
        println!(
            "| {n} | {} | {} | {} | {} ({} entries) |",
            ms(t.compile),
            ms(t.first),
            ms(t.unchanged),
            ms(t.with_nat),
            t.nat_entries
        );
    }
    Ok(())
}

fn ms(seconds: f64) -> String {
    format!("{:.1} ms", seconds * 1e3)
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed().as_secs_f64())
}

/// One round at one count: a fresh harness, the Service maps synced, then the packets.
fn packet_round(n: u32, samples: u16) -> Result<(PacketCosts, SyncTimes)> {
    let mut h = harness(Setup::Encap);
    h.pod_sends_from_gateway_mac();
    let measured = local_endpoints();
    for ip in &measured {
        let pod = Endpoint {
            ifindex: PEER_IFINDEX,
            mac: PEER_MAC,
            _pad: [0; 2],
            flags: 0,
        };
        h.maps.endpoints.insert(IpKey::v4(ip.octets()), pod, 0)?;
    }
    let mut services: Vec<K8sService> = Vec::new();
    let mut slices: Vec<EndpointSlice> = Vec::new();
    for i in 0..n {
        let (service, slice) = objects(i, &measured, Some(cluster_ip(i)));
        services.push(serde_json::from_value(service)?);
        slices.push(serde_json::from_value(slice)?);
    }
    let start = Instant::now();
    let tables = service::compile(
        &ServiceInputs {
            services: &services.iter().collect::<Vec<_>>(),
            slices: &slices.iter().collect::<Vec<_>>(),
            node_name: "node-1",
            node_port_addresses: &[],
        },
        &mut SetAllocator::new(),
    );
    let compile = start.elapsed().as_secs_f64();
    ensure!(
        tables.errors.is_empty() && tables.frontends.len() == n as usize,
        "the compiler made {} frontends of {n} Services: {:?}",
        tables.frontends.len(),
        tables.errors
    );
    let first = timed(|| h.maps.sync_services(&tables).map(drop))?;
    let unchanged = timed(|| h.maps.sync_services(&tables).map(drop))?;
    let costs = packets(&mut h, samples, &measured)?;
    // Nothing taken away: SERVICE_NAT is not walked, however many connections it holds.
    let nat_entries = h.maps.service_nat.keys().count();
    let with_nat = timed(|| h.maps.sync_services(&tables).map(drop))?;
    let times = SyncTimes {
        compile,
        first,
        unchanged,
        with_nat,
        nat_entries,
    };
    Ok((costs, times))
}

/// The three packet kinds, interleaved sample by sample so that drift hits them alike. A
/// repeated test run does not reset the packet between repeats: after the first, a packet sent
/// to the ClusterIP carries the endpoint's address and no longer meets the Service stages. So
/// those two kinds are single runs, each of a connection no earlier packet belonged to, and the
/// non-Service packet (left as it was, but for its MACs) is measured both ways.
fn packets(h: &mut Harness, samples: u16, endpoints: &[Ipv4Addr]) -> Result<PacketCosts> {
    let prog: &mut SchedClassifier = h
        .bpf
        .program_mut("from_pod")
        .context("from_pod")?
        .try_into()?;
    let vip = cluster_ip(0).octets();
    let to_pod = ipv4_l4(CLIENT_MAC, POD_V4, PEER_V4, 6, (40000, 80), TCP_ACK);
    let (mut new, mut established, mut other) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..samples {
        let syn = ipv4_l4(
            CLIENT_MAC,
            POD_V4,
            vip,
            6,
            (FIRST_PORT + i, SERVICE_PORT),
            TCP_SYN,
        );
        new.push(balanced(prog, &syn, endpoints)?);
        // Another connection: its first packet untimed, then its second.
        let ports = (FIRST_PORT + samples + i, SERVICE_PORT);
        balanced(
            prog,
            &ipv4_l4(CLIENT_MAC, POD_V4, vip, 6, ports, TCP_SYN),
            endpoints,
        )?;
        let ack = ipv4_l4(CLIENT_MAC, POD_V4, vip, 6, ports, TCP_ACK);
        established.push(balanced(prog, &ack, endpoints)?);
        other.push(once(prog, &to_pod)?.1);
    }
    let drops_before = drops(&h.maps)?;
    let mut repeated = f64::MAX;
    for _ in 0..3 {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&to_pod);
        opts.repeat = REPEAT;
        repeated = repeated.min(prog.test_run(opts)?.duration.as_nanos() as f64);
    }
    let dropped = drops(&h.maps)? - drops_before;
    ensure!(
        dropped == 0,
        "{dropped} of the repeated non-Service packets were dropped: {:?}",
        h.maps.counters()?.drops
    );
    Ok(PacketCosts {
        new: median(new),
        established: median(established),
        other: median(other),
        other_repeated: repeated,
    })
}

/// Packets dropped so far, for any reason.
fn drops(maps: &Maps) -> Result<u64> {
    Ok(maps.counters()?.drops.iter().map(|(_, n)| n).sum())
}

/// One run: the verdict, its time in ns, the packet as it left.
fn once(prog: &mut SchedClassifier, packet: &[u8]) -> Result<(u32, f64, Vec<u8>)> {
    let mut out = vec![0u8; packet.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.data_out = Some(&mut out);
    let result = prog.test_run(opts)?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, result.duration.as_nanos() as f64, out))
}

/// One run of a packet to the ClusterIP, checked to leave for one of `endpoints` (ACCEPT_PORT)
/// into its pod; its time in ns.
fn balanced(prog: &mut SchedClassifier, packet: &[u8], endpoints: &[Ipv4Addr]) -> Result<f64> {
    let (verdict, ns, out) = once(prog, packet)?;
    let dst = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    let port = u16::from_be_bytes([out[36], out[37]]);
    ensure!(
        verdict == TC_ACT_REDIRECT && endpoints.contains(&dst) && port == ACCEPT_PORT,
        "a packet to the ClusterIP left for {dst}:{port} with verdict {verdict}"
    );
    Ok(ns)
}
