//! Kernel tier, adversarial input (issue 10, DATAPATH-SPEC.md): over 100,000 mutated frames
//! through the real `lb_uplink` and `lb_backend`, each judged by the oracle in
//! `lb_tests::adversarial`; and one regression fixture per class A-I of the issue (the issue's
//! frames, moved to this fixture's MACs and addresses), each checking the spec's verdict and
//! output.
// A test reads top to bottom as the scenario it checks; splitting it would only scatter it.
#![allow(clippy::too_many_lines, reason = "test scenarios, see above")]
use std::net::IpAddr;

use lb_tests::{
    adversarial::{
        Deltas, Lab, Prog, Report, TC_NEXT, TC_REDIRECT, TC_SHOT, XDP_DROP, XDP_PASS, XDP_REDIRECT,
        XDP_TX, fuzz,
        wire::{
            ACK, Build, FIN, L4, SYN, TCP, Upper, be16, fixup, is_group_mac, l4_checksum_valid,
            parse, put16, unhex, valid,
        },
    },
    kernel::{CLIENT_MAC, GW_MAC, POD_MAC},
    netns::require_root,
};

/// The generator's seed: the same frames on every run.
const SEED: u64 = 0x1d_a7a9_a7b5;
/// At least 100,000 (issue 10); ADVERSARIAL_FRAMES overrides it for a quick look.
const FRAMES: usize = 120_000;

fn lab() -> Lab {
    Lab::new().expect("lab")
}

/// Runs `ADVERSARIAL_FRAMES` (else `default`) generated frames from `seed` through `lab` and
/// prints the report.
fn run(lab: &mut Lab, default: usize, seed: u64) -> Report {
    let frames = std::env::var("ADVERSARIAL_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    let (report, elapsed) = fuzz(lab, frames, seed);
    report.print(elapsed);
    report
}

/// The generator made more than 100 frames of each of `kinds`, and none broke the spec.
fn assert_clean(report: &Report, kinds: &[&str]) {
    for kind in kinds {
        assert!(
            report.by_kind.get(kind).copied().unwrap_or(0) > 100,
            "too few '{kind}' frames"
        );
    }
    let violations = report.violations();
    assert!(
        violations == 0,
        "{violations} violations of DATAPATH-SPEC.md in {} frames (summary and examples above)",
        report.frames
    );
}

#[test]
fn adversarial_frames_get_only_what_the_spec_allows() {
    if !require_root() {
        return;
    }
    let mut lab = lab();
    let report = run(&mut lab, FRAMES, SEED);
    println!(
        "flows in the model: {}, in the table: {}",
        lab.model.flows.len(),
        lab.fx.flow_count()
    );
    // The generator reached every kind of seed and the data path took every kind of verdict.
    assert_clean(
        &report,
        &[
            "snat reply on the uplink",
            "pod reply, snat",
            "pod reply, preserve-client-ip",
            "ICMP error about a reply",
            "ICMP error about a forwarded packet",
            "SYN clashing with a live flow",
        ],
    );
}

/// The same contract when the local pod's veth has a policy hook: what went into the veth is
/// now passed to the kernel rewritten, and everything else the spec says still holds.
#[test]
fn adversarial_frames_with_a_policy_hook_on_the_pod_veth_get_only_what_the_spec_allows() {
    if !require_root() {
        return;
    }
    let mut lab = lab();
    lab.fx.set_policy_hook(true).expect("policy hook");
    let report = run(&mut lab, FRAMES / 4, SEED ^ 0x9001);
    let passed = lab.fx.counter(lb_common::Counter::PassPolicyHook);
    println!("passed to the kernel through the policy hook: {passed}");
    assert!(
        passed > 100,
        "frames for the local pod reached the mark: {passed}"
    );
    assert_clean(&report, &[]);
}

/// The same contract when the local pod's delivery is `netfilter`: its flows' client packets are
/// passed to the kernel's forwarding rewritten (no snat, TTL left to the kernel), its replies go
/// on untranslated at `lb_backend`, and `lb_uplink_out` translates them as they leave the uplink
/// (frames of that kind, and their mutations, run through it), touching nothing else.
#[test]
fn adversarial_frames_with_the_pod_behind_netfilter_get_only_what_the_spec_allows() {
    if !require_root() {
        return;
    }
    let mut lab = lab();
    lab.fx
        .set_pod0_flags(lb_common::IFACE_NETFILTER)
        .expect("netfilter delivery");
    lab.net.netfilter = true;
    let report = run(&mut lab, FRAMES / 4, SEED ^ 0x4e46);
    let passed = lab.fx.counter(lb_common::Counter::PassNetfilter);
    let replied = lab.fx.counter(lb_common::Counter::ReplyNetfilter);
    println!("passed to the kernel's forwarding: {passed}; replies translated leaving: {replied}");
    assert!(passed > 100, "client packets passed to netfilter: {passed}");
    assert!(
        replied > 100,
        "replies translated by lb_uplink_out: {replied}"
    );
    assert_clean(
        &report,
        &[
            "netfilter reply leaving the uplink",
            "pod's own traffic leaving the uplink",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers of the regression fixtures.
// ---------------------------------------------------------------------------------------------

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An issue-10 frame (from another lab: MACs 02:0c:00:00:00:01/02) with this fixture's MACs.
fn adapt(hex: &str, dst_mac: [u8; 6], src_mac: [u8; 6]) -> Vec<u8> {
    let mut f = unhex(hex);
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    f
}

fn tcp(lab: &Lab, src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Build {
    Build {
        dst_mac: lab.net.up0_mac,
        src_mac: GW_MAC,
        vlan: None,
        src: ip(src),
        dst: ip(dst),
        ttl: 64,
        l4: L4::Tcp {
            sport,
            dport,
            seq: 1000,
            ack: if flags & ACK != 0 { 5000 } else { 0 },
            flags,
        },
        payload: vec![],
    }
}

fn from_pod(lab: &Lab, mut b: Build) -> Build {
    b.dst_mac = lab.net.pod0_mac;
    b.src_mac = POD_MAC;
    b
}

/// Sends a client's SYN and returns the output's (destination, source port): the backend and
/// the snat port (or the client's port).
fn open(lab: &mut Lab, src: &str, sport: u16, vip: &str, port: u16) -> (IpAddr, u16) {
    let (out, _) = lab
        .send(Prog::Uplink, &tcp(lab, src, sport, vip, port, SYN).frame())
        .unwrap();
    assert!(
        out.verdict == XDP_TX || out.verdict == XDP_REDIRECT,
        "SYN {src}:{sport} -> {vip}:{port}: verdict {}",
        out.verdict
    );
    let p = parse(&out.packet).ip.unwrap();
    let (_, sp, d, _, _) = p.tuple().unwrap();
    (d, sp)
}

fn assert_dropped(lab: &mut Lab, prog: Prog, frame: &[u8], counter: &str, what: &str) -> Deltas {
    let (out, d) = lab.send(prog, frame).unwrap();
    let drop = if prog == Prog::Uplink {
        XDP_DROP
    } else {
        TC_SHOT
    };
    assert_eq!(out.verdict, drop, "{what}: dropped");
    assert_eq!(
        d.get(counter),
        Some(1),
        "{what}: counted {counter} (moved: {:?})",
        d.moved()
    );
    assert_eq!(d.get("flows_created"), Some(0), "{what}: no flow");
    assert_eq!(
        d.get("sources_created"),
        Some(0),
        "{what}: no source bucket"
    );
    d
}

fn assert_passed_untouched(lab: &mut Lab, prog: Prog, frame: &[u8], what: &str) {
    let (out, d) = lab.send(prog, frame).unwrap();
    let pass = if prog == Prog::Uplink {
        XDP_PASS
    } else {
        TC_NEXT
    };
    assert_eq!(out.verdict, pass, "{what}: passed");
    assert_eq!(out.packet, frame, "{what}: untouched");
    assert_eq!(d.get("flows_created"), Some(0), "{what}: no flow");
}

/// For a node address §1/§2 leave open whether unbalanced traffic is dropped or passed: either,
/// but never sent on, and never rewritten.
fn assert_not_sent(lab: &mut Lab, prog: Prog, frame: &[u8], what: &str) {
    let (out, _) = lab.send(prog, frame).unwrap();
    match (prog, out.verdict) {
        (Prog::Uplink, XDP_DROP) | (Prog::Backend, TC_SHOT) => {}
        (Prog::Uplink, XDP_PASS) | (Prog::Backend, TC_NEXT) => {
            assert_eq!(out.packet, frame, "{what}: passed untouched");
        }
        (_, v) => panic!("{what}: verdict {v} (sent on)"),
    }
}

// ---------------------------------------------------------------------------------------------
// Issue 10, classes A-I.
// ---------------------------------------------------------------------------------------------

/// A: `payload_len + 40` must not wrap in 16 bits; a frame shorter than its IPv6 length is
/// malformed.
#[test]
fn a_ipv6_payload_length_near_0xffff_is_malformed() {
    if !require_root() {
        return;
    }
    let mut lab = lab();
    // fd00:a::10:40013 -> fd00:96::10:80 SYN, payload length 0xffff in a 74-byte frame.
    let issue = adapt(
        "020c00000001020c0000000286dd60000000ffff0640fd00000a000000000000000000000010fd0000960000000000000000000000109c4d0050000003e80000000050022000f49b0000",
        lab.net.up0_mac,
        GW_MAC,
    );
    assert_dropped(
        &mut lab,
        Prog::Uplink,
        &issue,
        "drop_malformed",
        "issue frame (A)",
    );
    for len in [0xffd8u16, 0xffd9, 0xffe0, 0xfffe] {
        let mut f = issue.clone();
        put16(&mut f, 18, len);
        assert_dropped(
            &mut lab,
            Prog::Uplink,
            &f,
            "drop_malformed",
            &format!("payload length {len:#x}"),
        );
    }
    // The same from the pod (a preserve-client-ip reply): not a VIP's, so passed untouched.
    let (pod, pod_port) = open(&mut lab, "fd00:a::11", 40014, "fd00:96::11", 443);
    let mut reply = from_pod(
        &lab,
        tcp(&lab, &pod.to_string(), 8443, "fd00:a::11", 40014, ACK),
    )
    .frame();
    assert_eq!(pod_port, 40014);
    put16(&mut reply, 18, 0xffff);
    assert_passed_untouched(
        &mut lab,
        Prog::Backend,
        &reply,
        "pod reply with payload length 0xffff",
    );
}

/// B: lb_backend checks lengths as lb_uplink does: nothing inconsistent leaves through it.
#[test]
fn b_lb_backend_does_not_forward_inconsistent_lengths() {
    if !require_root() {
        return;
    }
    let mut lab = lab();
    // snat to the local pod: the pod answers the node's port (the issue's frame: a 54-byte
    // frame whose IPv4 total length says 59).
    let (pod, node_port) = open(&mut lab, "10.0.0.10", 40100, "10.96.0.15", 80);
    assert_eq!(pod, ip("10.1.9.2"));
    let good = from_pod(
        &lab,
        tcp(&lab, "10.1.9.2", 8080, "10.0.0.1", node_port, ACK),
    )
    .frame();
    assert_eq!(good.len(), 54);
    let mut long = good.clone();
    put16(&mut long, 16, 59);
    fixup(&mut long, true, false);
    assert_not_sent(
        &mut lab,
        Prog::Backend,
        &long,
        "snat reply, total length 59 in a 54-byte frame",
    );
    // TCP header past the datagram (total length 39).
    let mut short = good.clone();
    put16(&mut short, 16, 39);
    fixup(&mut short, true, false);
    assert_not_sent(
        &mut lab,
        Prog::Backend,
        &short,
        "snat reply, total length 39",
    );
    let (out, _) = lab.send(Prog::Backend, &good).unwrap();
    assert_eq!(
        out.verdict, TC_REDIRECT,
        "the consistent reply is translated"
    );

    // preserve-client-ip: the pod answers the client; a broken one is the kernel's.
    open(&mut lab, "10.0.0.11", 40101, "10.96.0.11", 443);
    let good = from_pod(&lab, tcp(&lab, "10.1.9.2", 8443, "10.0.0.11", 40101, ACK)).frame();
    let mut long = good.clone();
    put16(&mut long, 16, 59);
    fixup(&mut long, true, false);
    assert_passed_untouched(
        &mut lab,
        Prog::Backend,
        &long,
        "preserve reply, total length 59",
    );
    // IPv6 payload length 0.
    open(&mut lab, "fd00:a::12", 40102, "fd00:96::11", 443);
    let mut zero = from_pod(
        &lab,
        tcp(&lab, "fd00:1:9::2", 8443, "fd00:a::12", 40102, ACK),
    )
    .frame();
    put16(&mut zero, 18, 0);
    assert_passed_untouched(
        &mut lab,
        Prog::Backend,
        &zero,
        "preserve reply, IPv6 payload length 0",
    );
}

/// C: reads and rewrites are bounded by the datagram, not the frame.
#[test]
fn c_reads_and_rewrites_stay_inside_the_datagram() {
    if !require_root() {
        return;
    }
    let mut lab = lab();
    // Total length 39: the TCP header is not inside the datagram.
    let issue = adapt(
        "020c00000001020c00000002080045000027000100004006665d0a00000a0a60000a9c410050000003e80000000050022000daf50000",
        lab.net.up0_mac,
        CLIENT_MAC,
    );
    assert_dropped(
        &mut lab,
        Prog::Uplink,
        &issue,
        "drop_malformed",
        "total length 39 (C)",
    );
    // Echo request from 203.0.113.7 with total length 1.
    let echo = adapt(
        "020c00000001020c00000002080045000001000100004001346acb0071070a60000a0800f8260007000170696e6721",
        lab.net.up0_mac,
        GW_MAC,
    );
    assert_dropped(
        &mut lab,
        Prog::Uplink,
        &echo,
        "drop_malformed",
        "echo with total length 1 (C)",
    );
    // Total length 0, and an IPv6 extension header past the payload.
    let mut zero = tcp(&lab, "10.0.0.10", 40200, "10.96.0.13", 80, SYN).frame();
    put16(&mut zero, 16, 0);
    fixup(&mut zero, true, false);
    assert_dropped(
        &mut lab,
        Prog::Uplink,
        &zero,
        "drop_malformed",
        "total length 0",
    );
    let mut ext = tcp(&lab, "fd00:a::10", 40201, "fd00:96::13", 80, SYN).frame();
    // Destination options claiming 40 bytes where the datagram has 28.
    ext.splice(54..54, [TCP, 4, 1, 4, 0, 0, 0, 0]);
    ext[20] = 60;
    put16(&mut ext, 18, 28);
    assert_dropped(
        &mut lab,
        Prog::Uplink,
        &ext,
        "drop_malformed",
        "extension header past the payload",
    );

    // A valid SYN with Ethernet padding: forwarded, the padding untouched.
    let mut padded = tcp(&lab, "10.0.0.10", 40202, "10.96.0.13", 80, SYN).frame();
    padded.extend([0xa5; 6]);
    let (out, _) = lab.send(Prog::Uplink, &padded).unwrap();
    assert_eq!(out.verdict, XDP_TX);
    assert_eq!(
        &out.packet[out.packet.len() - 6..],
        &[0xa5; 6],
        "padding untouched"
    );
    assert_eq!(out.packet.len(), padded.len());
}

/// D: a translated ICMP error whose quoted transport checksum lies past the message keeps a
/// valid ICMP checksum and the bytes after the datagram as they were.
#[test]
fn d_translated_icmp_error_has_a_valid_checksum_when_the_quote_is_short() {
    if !require_root() {
        return;
    }
    let mut lab = lab();
    let (backend, node_port) = open(&mut lab, "10.0.0.10", 40001, "10.96.0.10", 80);
    // 10.0.0.10 -> 10.96.0.10 port unreachable quoting 10.96.0.10:80 -> 10.0.0.10:40001 with 8
    // bytes of TCP; 10 trailing bytes hold (among others) where the quoted checksum would be.
    let issue = adapt(
        "020c00000001020c0000000208004500003800010000400166510a00000a0a60000a0303606b0000000045000028000100004006665c0a60000a0a00000a00509c4100000000a560c4c028e3b6fad351",
        lab.net.up0_mac,
        CLIENT_MAC,
    );
    let (out, d) = lab.send(Prog::Uplink, &issue).unwrap();
    assert!(
        out.verdict == XDP_TX || out.verdict == XDP_REDIRECT,
        "translated: {}",
        out.verdict
    );
    assert_eq!(d.get("icmp_errors_translated"), Some(1));
    let v = parse(&out.packet);
    let o = v.ip.as_ref().unwrap();
    assert_eq!(o.dst, backend, "to the flow's backend");
    assert_eq!(
        l4_checksum_valid(&out.packet, o),
        Some(true),
        "ICMP checksum valid"
    );
    assert!(valid(&out.packet[14..34], 0), "IPv4 header checksum valid");
    assert_eq!(o.ttl, 63, "forwarded: TTL one less");
    assert_eq!(
        &out.packet[out.packet.len() - 10..],
        &issue[issue.len() - 10..],
        "bytes after the datagram untouched"
    );
    let q = lb_tests::adversarial::wire::quote(&out.packet, o).unwrap();
    assert_eq!(
        (q.tuple.0, q.tuple.1, q.tuple.3),
        (backend, 8080, node_port),
        "quote as the backend sent it"
    );
}

/// E: preserve-client-ip, one client address:port to two VIPs on one pod port: the second
/// flow is refused and the first keeps its replies.
#[test]
fn e_a_clashing_new_flow_is_refused_and_the_live_one_keeps_working() {
    if !require_root() {
        return;
    }
    let mut lab = lab();
    for (client, a, b, pod) in [
        ("203.0.113.7", "10.96.0.11", "10.96.0.12", "10.1.9.2"),
        ("2001:db8:1::7", "fd00:96::11", "fd00:96::12", "fd00:1:9::2"),
    ] {
        let (backend, _) = open(&mut lab, client, 40061, a, 443);
        assert_eq!(backend, ip(pod));
        let syn = tcp(&lab, client, 40061, b, 443, SYN).frame();
        assert_dropped(
            &mut lab,
            Prog::Uplink,
            &syn,
            "drop_flow_clash",
            &format!("{client} to {b} (E)"),
        );
        let reply = from_pod(&lab, tcp(&lab, pod, 8443, client, 40061, ACK | SYN)).frame();
        let (out, _) = lab.send(Prog::Backend, &reply).unwrap();
        assert_eq!(out.verdict, TC_REDIRECT);
        let o = parse(&out.packet).ip.unwrap();
        assert_eq!(
            (o.src, o.tuple().unwrap().1, o.dst),
            (ip(a), 443, ip(client)),
            "the live flow's replies still come from its VIP"
        );
    }
}

/// F: a SYN/FIN cycle repeated on one tuple gets a snat port every time while ports are free.
#[test]
fn f_snat_port_claims_do_not_give_up_while_ports_are_free() {
    if !require_root() {
        return;
    }
    let mut lab = lab();
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..40 {
        let syn = tcp(&lab, "10.0.0.10", 45000, "10.96.0.15", 80, SYN).frame();
        let (out, d) = lab.send(Prog::Uplink, &syn).unwrap();
        assert_eq!(
            out.verdict,
            XDP_REDIRECT,
            "cycle {i}: SYN forwarded (counters moved: {:?})",
            d.moved()
        );
        let (_, port, backend, _, _) = parse(&out.packet).ip.unwrap().tuple().unwrap();
        assert_eq!(backend, ip("10.1.9.2"));
        assert!(
            ports.insert(port),
            "cycle {i}: port {port} of a flow still held"
        );
        let fin = tcp(&lab, "10.0.0.10", 45000, "10.96.0.15", 80, FIN | ACK).frame();
        let (out, _) = lab.send(Prog::Uplink, &fin).unwrap();
        assert_eq!(out.verdict, XDP_REDIRECT, "cycle {i}: FIN forwarded");
    }
}

/// G: IPv4-mapped IPv6 addresses are IPv6 addresses.
#[test]
fn g_ipv4_mapped_ipv6_addresses_never_match_ipv4_services() {
    if !require_root() {
        return;
    }
    let mut lab = lab();
    // fd00:a::10 -> ::ffff:10.96.0.10:80 SYN: not ours.
    let issue = adapt(
        "020c00000001020c0000000286dd6000000000140640fd00000a00000000000000000000001000000000000000000000ffff0a60000a9c4d0050000003e80000000050022000e7d80000",
        lab.net.up0_mac,
        CLIENT_MAC,
    );
    assert_passed_untouched(&mut lab, Prog::Uplink, &issue, "to ::ffff:10.96.0.10 (G)");
    // From ::ffff:10.0.0.10 to an IPv6 VIP: a source that is no client, no snat ::ffff:10.0.0.1.
    let mapped = tcp(&lab, "::ffff:10.0.0.10", 40300, "fd00:96::13", 80, SYN).frame();
    assert_dropped(
        &mut lab,
        Prog::Uplink,
        &mapped,
        "drop_bad_source",
        "from ::ffff:10.0.0.10",
    );
    // To the node address mapped: not ours either.
    let node = tcp(&lab, "fd00:a::10", 40301, "::ffff:10.0.0.1", 30080, SYN).frame();
    assert_passed_untouched(
        &mut lab,
        Prog::Uplink,
        &node,
        "to ::ffff:10.0.0.1 (a node port)",
    );
}

/// H: no answer, no flow, no bucket for sources that are no client; never a group source MAC.
#[test]
fn h_sources_that_are_no_client_get_no_answer_and_no_state() {
    if !require_root() {
        return;
    }
    let mut lab = lab();
    let issue = adapt(
        "020c00000001020c000000020800450000210001000040017072ffffffff0a60000a0800f8260007000170696e6721",
        lab.net.up0_mac,
        GW_MAC,
    );
    assert_dropped(
        &mut lab,
        Prog::Uplink,
        &issue,
        "drop_bad_source",
        "echo from 255.255.255.255 (H)",
    );
    let v4 = [
        "0.0.0.0",
        "127.0.0.1",
        "169.254.1.1",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "10.0.0.255",
        "10.2.0.255",
        "10.0.0.1",
        "10.2.0.1",
        "10.96.0.11",
    ];
    let v6 = [
        "::",
        "::1",
        "ff02::1",
        "fe80::1",
        "::ffff:10.0.0.10",
        "fd00:a::1",
        "fd00:96::11",
    ];
    for src in v4.iter().chain(v6.iter()) {
        let (vip, rst_vip) = if src.contains(':') {
            ("fd00:96::13", "fd00:96::14")
        } else {
            ("10.96.0.13", "10.96.0.14")
        };
        let echo = Build {
            l4: L4::Icmp {
                kind: if src.contains(':') { 128 } else { 8 },
                code: 0,
                rest: [0, 7, 0, 1],
            },
            payload: b"ping".to_vec(),
            ..tcp(&lab, src, 0, vip, 0, 0)
        }
        .frame();
        assert_dropped(
            &mut lab,
            Prog::Uplink,
            &echo,
            "drop_bad_source",
            &format!("echo from {src}"),
        );
        let syn = tcp(&lab, src, 40400, vip, 80, SYN).frame();
        assert_dropped(
            &mut lab,
            Prog::Uplink,
            &syn,
            "drop_bad_source",
            &format!("SYN from {src}"),
        );
        // The RST policy's service: no RST either, however many SYNs.
        for port in 40401..40406 {
            let syn = tcp(&lab, src, port, rst_vip, 80, SYN).frame();
            assert_dropped(
                &mut lab,
                Prog::Uplink,
                &syn,
                "drop_bad_source",
                &format!("SYN from {src} to the RST policy"),
            );
        }
    }
    // An echo request to a VIP in a broadcast frame, or from a group MAC: not answered, and
    // nothing leaves with a group source MAC.
    let echo = Build {
        l4: L4::Icmp {
            kind: 8,
            code: 0,
            rest: [0, 7, 0, 1],
        },
        payload: b"ping".to_vec(),
        ..tcp(&lab, "10.0.0.12", 0, "10.96.0.13", 0, 0)
    };
    for (dst, src) in [
        ([0xff; 6], CLIENT_MAC),
        (lab.net.up0_mac, [0xff; 6]),
        (lab.net.up0_mac, [0x01, 0, 0x5e, 0, 0, 1]),
    ] {
        let f = Build {
            dst_mac: dst,
            src_mac: src,
            ..echo.clone()
        }
        .frame();
        let (out, d) = lab.send(Prog::Uplink, &f).unwrap();
        assert!(
            out.verdict == XDP_DROP || out.verdict == XDP_PASS,
            "not answered: {}",
            out.verdict
        );
        assert_eq!(d.get("icmp_echo_replies"), Some(0));
        assert!(
            out.verdict != XDP_PASS || out.packet == f,
            "passed untouched"
        );
        assert!(!is_group_mac(&out.packet[6..12].try_into().unwrap()) || out.packet == f);
    }
}

/// I: malformed (not truncated) datagrams to a VIP are dropped as malformed.
#[test]
fn i_malformed_datagrams_to_a_vip_are_dropped() {
    type Break = fn(&mut Vec<u8>);
    if !require_root() {
        return;
    }
    let mut lab = lab();
    // IPv4 header checksum 0.
    let issue = adapt(
        "020c00000001020c0000000208004500002800010000400600000a00000a0a60000a9c410050000003e80000000050022000daf50000",
        lab.net.up0_mac,
        CLIENT_MAC,
    );
    assert_dropped(
        &mut lab,
        Prog::Uplink,
        &issue,
        "drop_malformed",
        "IPv4 header checksum 0 (I)",
    );

    let syn = |lab: &Lab| tcp(lab, "10.0.0.10", 40500, "10.96.0.13", 80, SYN).frame();
    let udp = |lab: &Lab, dst: &str| {
        Build {
            l4: L4::Udp {
                sport: 40501,
                dport: 53,
            },
            payload: b"query".to_vec(),
            ..tcp(
                lab,
                if dst.contains(':') {
                    "fd00:a::10"
                } else {
                    "10.0.0.10"
                },
                0,
                dst,
                0,
                0,
            )
        }
        .frame()
    };
    let cases: Vec<(&str, Vec<u8>, Break)> = vec![
        ("IHL 4", syn(&lab), |f| {
            f[14] = 0x44;
            fixup(f, true, false);
        }),
        ("IHL 0", syn(&lab), |f| {
            f[14] = 0x40;
        }),
        ("TCP data offset 4", syn(&lab), |f| {
            f[46] = 0x40;
            fixup(f, false, true);
        }),
        ("TCP data offset past the segment", syn(&lab), |f| {
            f[46] = 0xf0;
            fixup(f, false, true);
        }),
        ("UDP length 7", udp(&lab, "10.96.0.53"), |f| {
            put16(f, 38, 7);
            fixup(f, false, true);
        }),
        (
            "UDP length past the datagram",
            udp(&lab, "10.96.0.53"),
            |f| {
                let l = be16(f, 38) + 1;
                put16(f, 38, l);
                fixup(f, false, true);
            },
        ),
        ("IPv6 UDP checksum 0", udp(&lab, "fd00:96::53"), |f| {
            put16(f, 60, 0);
        }),
        (
            "IPv6 hop-by-hop after destination options",
            {
                let mut f = tcp(&lab, "fd00:a::10", 40502, "fd00:96::13", 80, SYN).frame();
                f.splice(54..54, [0, 0, 1, 4, 0, 0, 0, 0, TCP, 0, 1, 4, 0, 0, 0, 0]);
                f[20] = 60;
                let l = be16(&f, 18) + 16;
                put16(&mut f, 18, l);
                f
            },
            |f| fixup(f, false, true),
        ),
    ];
    for (what, mut f, break_it) in cases {
        break_it(&mut f);
        assert_dropped(&mut lab, Prog::Uplink, &f, "drop_malformed", what);
    }
}

/// The rest of issue 10: TTL, other hosts' frames, state for dropped packets, RSTs and options.
#[test]
fn also_ttl_foreign_frames_state_of_drops_and_rst_options() {
    if !require_root() {
        return;
    }
    let mut lab = lab();
    // TTL one less when forwarded; <= 1 dropped and counted.
    let (out, _) = lab
        .send(
            Prog::Uplink,
            &tcp(&lab, "10.0.0.10", 40600, "10.96.0.13", 80, SYN).frame(),
        )
        .unwrap();
    assert_eq!(out.verdict, XDP_TX);
    assert_eq!(parse(&out.packet).ip.unwrap().ttl, 63);
    for (src, vip) in [("10.0.0.10", "10.96.0.13"), ("fd00:a::10", "fd00:96::13")] {
        for ttl in [0, 1] {
            let f = Build {
                ttl,
                ..tcp(&lab, src, 40601, vip, 80, SYN)
            }
            .frame();
            assert_dropped(
                &mut lab,
                Prog::Uplink,
                &f,
                "drop_ttl_exceeded",
                &format!("{src} TTL {ttl}"),
            );
        }
    }
    // A reply from the pod with TTL 1.
    open(&mut lab, "10.0.0.13", 40602, "10.96.0.11", 443);
    let reply = Build {
        ttl: 1,
        ..from_pod(&lab, tcp(&lab, "10.1.9.2", 8443, "10.0.0.13", 40602, ACK))
    }
    .frame();
    assert_dropped(
        &mut lab,
        Prog::Backend,
        &reply,
        "drop_ttl_exceeded",
        "pod reply with TTL 1",
    );

    // Frames for another host, broadcast or multicast: not balanced; to a VIP dropped.
    let syn = tcp(&lab, "10.0.0.10", 40603, "10.96.0.13", 80, SYN);
    for mac in [
        [0x02, 0, 0, 0, 0x77, 0x77],
        [0xff; 6],
        [0x01, 0, 0x5e, 0, 0, 1],
    ] {
        let f = Build {
            dst_mac: mac,
            ..syn.clone()
        }
        .frame();
        let (out, d) = lab.send(Prog::Uplink, &f).unwrap();
        // Issue 10's invariant 1: passed untouched (the kernel drops what is not for this
        // host), never balanced.
        assert_eq!(out.verdict, XDP_PASS, "frame for {mac:02x?} to a VIP");
        assert_eq!(out.packet, f, "untouched");
        assert_eq!(d.get("flows_created"), Some(0));
    }
    // Too big for the uplink's MTU: dropped, and nothing created for it.
    let big = Build {
        l4: L4::Udp {
            sport: 40604,
            dport: 53,
        },
        payload: vec![0; 1600],
        ..tcp(&lab, "10.0.0.10", 0, "10.96.0.53", 0, 0)
    }
    .frame();
    let (out, d) = lab.send(Prog::Uplink, &big).unwrap();
    if out.verdict == XDP_DROP {
        assert_eq!(
            d.get("flows_created"),
            Some(0),
            "no flow for a dropped packet (§7)"
        );
        assert_eq!(d.get("sources_created"), Some(0));
    }
    // The RST policy allows 3 SYNs a second per source, then answers with RSTs: without
    // options, and never for a SYN with IPv4 options.
    for port in 40610..40613 {
        open(&mut lab, "10.0.0.14", port, "10.96.0.14", 80);
    }
    let mut with_options = tcp(&lab, "10.0.0.14", 40614, "10.96.0.14", 80, SYN).frame();
    with_options.splice(34..34, [0x94, 4, 0, 0]);
    with_options[14] = 0x46;
    put16(&mut with_options, 16, 44);
    fixup(&mut with_options, true, false);
    let (out, _) = lab.send(Prog::Uplink, &with_options).unwrap();
    assert_eq!(
        out.verdict, XDP_DROP,
        "a SYN with IPv4 options is not answered with a RST"
    );
    let plain = tcp(&lab, "10.0.0.14", 40615, "10.96.0.14", 80, SYN).frame();
    let (out, _) = lab.send(Prog::Uplink, &plain).unwrap();
    assert_eq!(out.verdict, XDP_TX, "RST");
    let o = parse(&out.packet).ip.unwrap();
    assert!(
        matches!(o.upper, Some(Upper::Tcp { header_len: 20, .. })),
        "a RST without options"
    );
    assert_eq!(o.ttl, 64);
}
