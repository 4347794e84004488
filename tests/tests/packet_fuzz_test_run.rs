//! Random and mutated frames through the real programs (BPF_PROG_TEST_RUN), each checked
//! against invariants that hold whatever its bytes:
//!
//! 1. Nothing unparsed goes on: a frame a program forwards (redirects, or passes to the stack)
//!    is Ethernet + ARP, IPv4 or IPv6 whose headers fit in it, and so is what it sends.
//! 2. SpoofGuard: `from_pod` forwards nothing whose source MAC, ARP sender or IP source is not
//!    the pod's.
//! 3. Isolation: with the pod isolated both ways by policies that allow nothing, `from_pod`
//!    forwards no IP packet of it (ARP is still answered), and no program delivers a packet to
//!    an ingress-isolated local pod (`from_pod` from its neighbour, `from_tunnel` from another
//!    node).
//! 4. Rewrites keep checksums: a TCP or UDP packet to a ClusterIP that arrived with valid
//!    checksums leaves with valid ones, whatever its ports, flags, options and payload.
//!
//! Each test runs `SLUICE_FUZZ_FRAMES` frames (default 20,000), or for `SLUICE_FUZZ_SECONDS`
//! when set (`cargo xtask fuzz packets`). A failure names its seed; `SLUICE_FUZZ_SEED=N`
//! replays it.

use std::time::{Duration, Instant};

use sluice_common::{scope, EndpointPolicy, IpKey};
use sluice_tests::test_run::*;

mod service_fixtures;
use service_fixtures::*;

const ARP: u16 = 0x0806;
const IPV4: u16 = 0x0800;
const IPV6: u16 = 0x86dd;

/// splitmix64: small, fast, and the same sequence for the same seed on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// How long a test fuzzes, and from which seed.
struct Budget {
    frames: u64,
    until: Option<Instant>,
    seed: u64,
}

impl Budget {
    fn from_env() -> Budget {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        Budget {
            frames: var("SLUICE_FUZZ_FRAMES").unwrap_or(20_000),
            until: var("SLUICE_FUZZ_SECONDS").map(|s| Instant::now() + Duration::from_secs(s)),
            seed: var("SLUICE_FUZZ_SEED").unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            }),
        }
    }

    /// Calls `case` with a fresh generator per frame (seeded `seed + n`, so any one frame
    /// replays alone), while the budget lasts; returns how many frames ran.
    fn run(&self, mut case: impl FnMut(&mut Rng, u64)) -> u64 {
        let mut n = 0;
        while match self.until {
            Some(until) => Instant::now() < until,
            None => n < self.frames,
        } {
            let seed = self.seed.wrapping_add(n);
            case(&mut Rng(seed), seed);
            n += 1;
        }
        n
    }
}

/// Header bytes worth aiming at: EtherType, IPv4 version/IHL, total length, fragment field,
/// protocol; IPv6 payload length and next header; the L4 ports, TCP data offset and flags.
const FIELDS: [usize; 14] = [12, 13, 14, 16, 17, 20, 21, 23, 18, 19, 34, 36, 46, 47];
const VALUES: [u8; 10] = [0, 1, 5, 6, 17, 0x3f, 0x45, 0x4f, 0x60, 0xff];

/// One of `seeds`, changed in one to four ways: a bit flipped, a byte replaced (anywhere or in
/// a header field, with a random or a boundary value), cut short, grown with random bytes, or
/// replaced by random bytes altogether; padded to what BPF_PROG_TEST_RUN takes.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut frame = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        match rng.below(8) {
            0 if !frame.is_empty() => {
                let i = rng.below(frame.len());
                frame[i] ^= 1 << rng.below(8);
            }
            1 if !frame.is_empty() => {
                let i = rng.below(frame.len());
                frame[i] = rng.byte();
            }
            2 | 3 => {
                let i = FIELDS[rng.below(FIELDS.len())];
                if i < frame.len() {
                    frame[i] = match rng.below(2) {
                        0 => VALUES[rng.below(VALUES.len())],
                        _ => rng.byte(),
                    };
                }
            }
            4 => frame.truncate(rng.below(frame.len() + 1)),
            5 => {
                let extra = rng.below(64);
                frame.extend((0..extra).map(|_| rng.byte()));
            }
            6 if rng.below(4) == 0 => {
                let len = rng.below(128);
                frame = (0..len).map(|_| rng.byte()).collect();
            }
            _ => {}
        }
    }
    // BPF_PROG_TEST_RUN refuses an skb shorter than an Ethernet header, and an IPv4 or IPv6
    // one shorter than its IP header: those it cannot send.
    if frame.len() < 14 {
        frame.resize(14, 0);
    }
    let least = match be16(&frame, 12) {
        IPV4 => 34,
        IPV6 => 54,
        _ => 14,
    };
    if frame.len() < least {
        frame.resize(least, 0);
    }
    frame
}

fn be16(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

/// Why `frame` is not a well-formed Ethernet + ARP/IPv4/IPv6 frame whose headers fit in it.
fn malformed(frame: &[u8]) -> Option<String> {
    if frame.len() < 14 {
        return Some(format!("{} bytes, no Ethernet header", frame.len()));
    }
    let ip_len = frame.len() - 14;
    match be16(frame, 12) {
        ARP => (ip_len < 28).then(|| format!("ARP in {ip_len} bytes")),
        IPV4 => {
            if ip_len < 20 || frame[14] >> 4 != 4 {
                return Some("IPv4 without its header".into());
            }
            let header = usize::from(frame[14] & 0x0f) * 4;
            let total = usize::from(be16(frame, 16));
            if header < 20 || header > ip_len || total < header || total > ip_len {
                return Some(format!(
                    "IPv4 header {header} bytes, total length {total}, {ip_len} bytes there"
                ));
            }
            let later_fragment = be16(frame, 20) & 0x1fff != 0;
            let l4 = match frame[23] {
                IPPROTO_TCP => 20,
                IPPROTO_UDP => 8,
                _ => 0,
            };
            (!later_fragment && total - header < l4).then(|| {
                format!(
                    "protocol {} in {} bytes after the IPv4 header",
                    frame[23],
                    total - header
                )
            })
        }
        IPV6 => {
            if ip_len < 40 || frame[14] >> 4 != 6 {
                return Some("IPv6 without its header".into());
            }
            let payload = usize::from(be16(frame, 18));
            (payload > ip_len - 40)
                .then(|| format!("IPv6 payload length {payload}, {} bytes there", ip_len - 40))
        }
        other => Some(format!("EtherType {other:#06x}")),
    }
}

fn forwarded(verdict: u32) -> bool {
    verdict != TC_ACT_SHOT
}

/// Fails naming the seed and the frame.
fn fail(seed: u64, program: &str, frame: &[u8], what: String) -> ! {
    panic!("seed {seed}: {program}: {what}\n  frame: {frame:02x?}\n  replay: SLUICE_FUZZ_SEED={seed} SLUICE_FUZZ_FRAMES=1")
}

/// Seeds the pod sends: TCP, UDP and ICMP to its neighbour, another node and the outside, UDP
/// over IPv6, ARP for the gateway.
fn pod_seeds() -> Vec<Vec<u8>> {
    let tcp = |dst| ipv4_tcp(POD_MAC, POD_V4, dst);
    vec![
        tcp(PEER_V4),
        tcp(REMOTE_POD_V4),
        tcp(OUTSIDE_V4),
        ipv4_l4(POD_MAC, POD_V4, PEER_V4, IPPROTO_UDP, (5353, 53), 0),
        ipv4_l4(POD_MAC, POD_V4, REMOTE_POD_V4, 1, (0x0800, 0), 0),
        ipv6_udp(POD_MAC, POD_V6, PEER_V6),
        arp(1, POD_MAC, POD_V4, GW_V4),
    ]
}

#[test]
fn from_pod_forwards_only_what_it_parsed_and_only_the_pods_own() {
    let mut h = harness(Setup::Encap);
    let seeds = pod_seeds();
    let budget = Budget::from_env();
    let mut passed = 0;
    let frames = budget.run(|rng, seed| {
        let frame = mutate(rng, &seeds);
        let (verdict, out) = h.run("from_pod", &frame);
        if !forwarded(verdict) {
            return;
        }
        passed += 1;
        if let Some(why) = malformed(&frame) {
            fail(
                seed,
                "from_pod",
                &frame,
                format!("forwarded ({verdict}) {why}"),
            );
        }
        if let Some(why) = malformed(&out) {
            fail(
                seed,
                "from_pod",
                &frame,
                format!("sent a malformed frame: {why}"),
            );
        }
        let spoofed = match be16(&frame, 12) {
            ARP => frame[6..12] != POD_MAC || frame[22..28] != POD_MAC || frame[28..32] != POD_V4,
            IPV4 => frame[6..12] != POD_MAC || frame[26..30] != POD_V4,
            _ => frame[6..12] != POD_MAC || frame[22..38] != POD_V6,
        };
        if spoofed {
            fail(
                seed,
                "from_pod",
                &frame,
                format!("forwarded ({verdict}) a frame not the pod's own"),
            );
        }
    });
    eprintln!(
        "{frames} frames from seed {}, {passed} forwarded",
        budget.seed
    );
    assert!(
        passed > 0,
        "mutations that leave a frame valid are forwarded"
    );
}

#[test]
fn an_isolated_pod_sends_and_receives_nothing_its_policies_do_not_allow() {
    let mut h = harness(Setup::Encap);
    // What another node sends PEER through the tunnel, decapsulated.
    let remote = |proto| ipv4_l4(GW_MAC, REMOTE_POD_V4, PEER_V4, proto, (40000, 80), 0x02);
    let tunnel_seeds = vec![remote(IPPROTO_TCP), remote(IPPROTO_UDP), remote(1)];
    let (verdict, out) = h.run("from_tunnel", &tunnel_seeds[0]);
    assert_eq!(
        (verdict, &out[0..6]),
        (TC_ACT_REDIRECT, &PEER_MAC[..]),
        "before isolation, the tunnel delivers to PEER"
    );
    // Both pods isolated both ways, by policy ids that have no rule.
    for (v4, v6) in [(POD_V4, POD_V6), (PEER_V4, PEER_V6)] {
        for addr in [IpKey::v4(v4), IpKey::v6(v6)] {
            let isolated = EndpointPolicy {
                ingress_policy: 1,
                egress_policy: 1,
            };
            h.maps.endpoint_policy.insert(addr, isolated, 0).unwrap();
        }
    }
    let seeds = pod_seeds();
    let budget = Budget::from_env();
    let frames = budget.run(|rng, seed| {
        let frame = mutate(rng, &seeds);
        let (verdict, _) = h.run("from_pod", &frame);
        let ip = frame.len() >= 14 && be16(&frame, 12) != ARP;
        if forwarded(verdict) && ip {
            fail(
                seed,
                "from_pod",
                &frame,
                format!("an egress-isolated pod's packet forwarded ({verdict})"),
            );
        }
        let frame = mutate(rng, &tunnel_seeds);
        let (verdict, out) = h.run("from_tunnel", &frame);
        if forwarded(verdict) && out.len() >= 6 && out[0..6] == PEER_MAC {
            fail(
                seed,
                "from_tunnel",
                &frame,
                format!("delivered ({verdict}) into an ingress-isolated pod"),
            );
        }
    });
    eprintln!("{frames} frame pairs from seed {}", budget.seed);
}

#[test]
fn service_rewrites_keep_checksums_valid_whatever_the_packet() {
    let mut h = harness(Setup::Encap);
    local_pods(&mut h);
    let flows: Vec<Flow> = [IPPROTO_TCP, IPPROTO_UDP]
        .into_iter()
        .flat_map(|proto| {
            [
                (ip(POD_V4), ip(CLUSTER_IP_V4)),
                (ip(POD_V6), ip(CLUSTER_IP_V6)),
            ]
            .map(|(src, dst)| Flow {
                src,
                dst,
                proto,
                src_port: CLIENT_PORT,
                dst_port: SERVICE_PORT,
            })
        })
        .collect();
    for flow in &flows {
        let endpoint = match flow.dst {
            std::net::IpAddr::V4(_) => ip(PEER_V4),
            std::net::IpAddr::V6(_) => ip(PEER_V6),
        };
        add_service(
            &mut h,
            frontend(*flow, scope::INTERNAL),
            0,
            &[(endpoint, TARGET_PORT)],
        );
    }
    let budget = Budget::from_env();
    let frames = budget.run(|rng, seed| {
        let flow = flows[rng.below(flows.len())];
        let mut frame = Flow {
            src_port: rng.next() as u16,
            ..flow
        }
        .frame(GW_MAC, POD_MAC);
        let l4 = if flow.dst.is_ipv4() { 34 } else { 54 };
        // Anything after the ports: TCP sequence numbers, flags, window; UDP's length stays.
        let first = if flow.proto == IPPROTO_TCP {
            l4 + 4
        } else {
            l4 + 8
        };
        for _ in 0..rng.below(6) {
            let i = first + rng.below(frame.len() - first);
            if flow.proto == IPPROTO_TCP && i == l4 + 12 {
                continue; // the data offset: the payload is not options
            }
            frame[i] = rng.byte();
        }
        if flow.proto == IPPROTO_UDP && flow.dst.is_ipv4() && rng.below(4) == 0 {
            frame[l4 + 6..l4 + 8].fill(0); // no checksum, which must stay none
        } else {
            set_checksums(&mut frame);
        }
        let (verdict, out) = h.run("from_pod", &frame);
        if verdict != TC_ACT_REDIRECT {
            fail(
                seed,
                "from_pod",
                &frame,
                format!("a valid packet to a ClusterIP got {verdict}"),
            );
        }
        let checked = std::panic::catch_unwind(|| assert_checksums(&out));
        if checked.is_err() {
            fail(
                seed,
                "from_pod",
                &frame,
                format!("rewritten with a wrong checksum: {out:02x?}"),
            );
        }
    });
    eprintln!("{frames} frames from seed {}", budget.seed);
}
