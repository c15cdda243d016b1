fn main() {
    let t = std::time::Instant::now();
    let mut ebpf = lb_userspace::dataplane::load(&Default::default(), None)
        .unwrap()
        .ebpf;
    println!("load {:?}", t.elapsed());
    for name in [
        lb_common::PROG_UPLINK,
        lb_common::PROG_BACKEND,
        lb_common::PROG_NEW_FLOW,
        lb_common::PROG_ICMP,
    ] {
        let p = lb_userspace::dataplane::program_mut(&mut ebpf, name).unwrap();
        let info = p.info().unwrap();
        println!(
            "{name}: verified insns {:?} jitted {:?} xlated {:?}",
            info.verified_instruction_count(),
            info.size_jitted(),
            info.size_translated()
        );
    }
}
