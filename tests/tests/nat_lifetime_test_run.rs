//! How long a load-balanced connection keeps its endpoint, through BPF_PROG_TEST_RUN: SERVICE_NAT
//! entries expire by protocol and TCP state like conntrack's. Entries are aged by rewriting the
//! time they record (`nat_flags::SEEN_SHIFT`), so no test waits for a timeout.

use std::net::IpAddr;

use sluice_common::{ct_timeout, nat_flags, scope, FlowKey, NatEntry};
use sluice_tests::test_run::*;

mod service_fixtures;
use service_fixtures::*;

const TICKS: u32 = 1 << 24;

/// Timeouts in the ticks entries record them in (2^30 ns), plus the tick of rounding.
fn ticks(timeout_ns: u64) -> u32 {
    (timeout_ns >> 30) as u32 + 2
}

fn client(proto: u8) -> Flow {
    Flow {
        src: ip(POD_V4),
        dst: ip(CLUSTER_IP_V4),
        proto,
        src_port: CLIENT_PORT,
        dst_port: SERVICE_PORT,
    }
}

fn natted(flow: Flow, endpoint: IpAddr) -> Flow {
    Flow {
        dst: endpoint,
        dst_port: TARGET_PORT,
        ..flow
    }
}

/// A ClusterIP whose one endpoint is PEER; returns the harness and its backend set.
fn service(proto: u8) -> (Harness, u32) {
    let mut h = harness(Setup::Encap);
    local_pods(&mut h);
    let set = add_service(
        &mut h,
        frontend(client(proto), scope::INTERNAL),
        0,
        &[(ip(PEER_V4), TARGET_PORT)],
    );
    (h, set)
}

/// The endpoint POD's packet of `flow` (with TCP flags `tcp_flags`) went to.
fn send(h: &mut Harness, flow: Flow, tcp_flags: u8) -> IpAddr {
    let mut frame = flow.frame(GW_MAC, POD_MAC);
    if flow.proto == IPPROTO_TCP {
        frame[14 + 20 + 13] = tcp_flags;
        set_checksums(&mut frame);
    }
    let (verdict, out) = h.run("from_pod", &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    ip(<[u8; 4]>::try_from(&out[30..34]).unwrap())
}

fn entry(h: &Harness, key: FlowKey) -> NatEntry {
    h.maps.service_nat.get(&key, 0).expect("entry")
}

/// Makes the entry look last used `ticks` ago.
fn age(h: &mut Harness, key: FlowKey, ticks: u32) {
    let mut e = entry(h, key);
    let seen = (e.flags >> nat_flags::SEEN_SHIFT).wrapping_sub(ticks) % TICKS;
    e.flags = (e.flags & nat_flags::MASK) | (seen << nat_flags::SEEN_SHIFT);
    h.maps.service_nat.insert(key, e, 0).unwrap();
}

/// The set's one endpoint becomes another pod, behind the agent's back (no flush): only a
/// connection balanced anew goes there.
fn replace_endpoint(h: &mut Harness, set: u32) -> IpAddr {
    let other = ip(OTHER_REMOTE_POD_V4);
    set_backend(h, set, 0, other, TARGET_PORT);
    other
}

#[test]
fn a_udp_flow_quiet_beyond_its_timeout_is_balanced_anew() {
    let (mut h, set) = service(IPPROTO_UDP);
    let flow = client(IPPROTO_UDP);
    assert_eq!(send(&mut h, flow, 0), ip(PEER_V4));
    let other = replace_endpoint(&mut h, set);
    let reverse = natted(flow, ip(PEER_V4)).reply().key();
    age(&mut h, flow.key(), ticks(ct_timeout::UDP) - 3);
    age(&mut h, reverse, ticks(ct_timeout::UDP) - 3);
    assert_eq!(send(&mut h, flow, 0), ip(PEER_V4), "within its timeout");
    age(&mut h, flow.key(), ticks(ct_timeout::UDP));
    age(&mut h, reverse, ticks(ct_timeout::UDP));
    assert_eq!(
        send(&mut h, flow, 0),
        other,
        "quiet too long: balanced anew"
    );
    assert_eq!(
        entry(&h, flow.key()).dst,
        sluice_agent::model::ip_key(other),
        "its entry overwritten"
    );
}

#[test]
fn a_flow_whose_endpoint_keeps_sending_stays() {
    let (mut h, set) = service(IPPROTO_UDP);
    let flow = client(IPPROTO_UDP);
    assert_eq!(send(&mut h, flow, 0), ip(PEER_V4));
    replace_endpoint(&mut h, set);
    // Only the client went quiet: the reverse entry is fresh.
    age(&mut h, flow.key(), ticks(ct_timeout::UDP) * 2);
    assert_eq!(send(&mut h, flow, 0), ip(PEER_V4));
}

#[test]
fn tcp_timeouts_follow_the_connection_state() {
    let (mut h, set) = service(IPPROTO_TCP);
    let flow = client(IPPROTO_TCP);
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const FIN_ACK: u8 = 0x11;
    assert_eq!(send(&mut h, flow, SYN), ip(PEER_V4));
    assert_eq!(
        entry(&h, flow.key()).flags & (nat_flags::ESTABLISHED | nat_flags::CLOSING),
        0,
        "opening"
    );
    let other = replace_endpoint(&mut h, set);
    let reverse = natted(flow, ip(PEER_V4)).reply().key();
    assert_eq!(send(&mut h, flow, ACK), ip(PEER_V4));
    assert_ne!(
        entry(&h, flow.key()).flags & nat_flags::ESTABLISHED,
        0,
        "established after the client's ACK"
    );
    // Beyond the opening timeout, within the established one.
    let idle = ticks(ct_timeout::TCP_OPENING) * 10;
    age(&mut h, flow.key(), idle);
    age(&mut h, reverse, idle);
    assert_eq!(
        send(&mut h, flow, ACK),
        ip(PEER_V4),
        "an idle established connection"
    );
    assert_eq!(send(&mut h, flow, FIN_ACK), ip(PEER_V4));
    assert_ne!(entry(&h, flow.key()).flags & nat_flags::CLOSING, 0);
    age(&mut h, flow.key(), ticks(ct_timeout::TCP_CLOSING));
    age(&mut h, reverse, ticks(ct_timeout::TCP_CLOSING));
    // The reverse entry never saw the FIN: it is judged by its own (opening) timeout.
    age(&mut h, reverse, ticks(ct_timeout::TCP_OPENING));
    assert_eq!(
        send(&mut h, flow, SYN),
        other,
        "closed: the tuple is balanced anew"
    );
}

#[test]
fn a_reply_after_a_long_silence_still_comes_from_the_frontend() {
    let (mut h, _) = service(IPPROTO_UDP);
    let flow = client(IPPROTO_UDP);
    assert_eq!(send(&mut h, flow, 0), ip(PEER_V4));
    let reply = natted(flow, ip(PEER_V4)).reply();
    age(&mut h, reply.key(), ticks(ct_timeout::UDP) * 2);
    let (verdict, out) = h.run("from_pod", &reply.frame(GW_MAC, PEER_MAC));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_checksums(&out);
    assert_eq!(
        out,
        flow.reply().frame(POD_MAC, GW_MAC),
        "translated back to the frontend"
    );
    let seen = entry(&h, reply.key()).flags >> nat_flags::SEEN_SHIFT;
    let before = entry(&h, flow.key()).flags >> nat_flags::SEEN_SHIFT;
    assert!(
        seen.wrapping_sub(before) % TICKS <= 1,
        "the reply refreshed its entry"
    );
}

#[test]
fn an_entry_an_older_agent_wrote_is_kept_and_timed_from_its_next_packet() {
    let (mut h, set) = service(IPPROTO_UDP);
    let flow = client(IPPROTO_UDP);
    assert_eq!(send(&mut h, flow, 0), ip(PEER_V4));
    replace_endpoint(&mut h, set);
    // Agents before entries kept time left the upper bits zero.
    let mut older = entry(&h, flow.key());
    older.flags &= nat_flags::MASK;
    h.maps.service_nat.insert(flow.key(), older, 0).unwrap();
    assert_eq!(
        send(&mut h, flow, 0),
        ip(PEER_V4),
        "the connection keeps its endpoint"
    );
    assert_ne!(
        entry(&h, flow.key()).flags >> nat_flags::SEEN_SHIFT,
        0,
        "timed from now on"
    );
}
