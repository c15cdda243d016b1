fn main() {
    let mut ebpf = match lb_userspace::dataplane::load(&Default::default(), None) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
        }
    };
    let _ = &mut ebpf;
    println!("loaded ok");
    lb_userspace::dataplane::load_tools().unwrap();
    println!("tools ok");
}
