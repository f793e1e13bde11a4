//! Loopback migration of the KVM guest over TCP, printing what the VMM side costs.
//!
//! `cargo run --release -p rdmig-vmm --example kvm_loopback -- [MEM_MIB WS_MIB RATE_MIB_S RUNS DOWNTIME_MS]`
//! (defaults: 1024 64 256 3 10). The real benchmark is `rdma-bench migrate --vm kvm`.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use rdmig_transport::auth::Psk;
use rdmig_transport::mem::PageSize;
use rdmig_transport::pages::PageSet;
use rdmig_transport::session::{accept, migrate, MigrationConfig};
use rdmig_transport::vm::SourceVm;
use rdmig_transport::wire::TransportKind;
use rdmig_vmm::kvm::{
    into_kvm, kvm_available, kvm_destination_factory, KvmConfig, KvmDestConfig, KvmVm,
};

fn main() {
    if let Err(why) = kvm_available() {
        eprintln!("SKIP: /dev/kvm not usable: {why}");
        return;
    }
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let arg = |i: usize, d: u64| args.get(i).copied().unwrap_or(d);
    let cfg = KvmConfig {
        mem_bytes: arg(0, 1024) << 20,
        working_set: arg(1, 64) << 20,
        dirty_rate: arg(2, 256) << 20,
        page_size: PageSize::KIB4,
        memfd: false,
        populated: None,
    };
    for run in 0..arg(3, 3) {
        let t = Instant::now();
        let mut src = KvmVm::start(&cfg).expect("start");
        let started = t.elapsed();
        std::thread::sleep(Duration::from_millis(300));
        if run == 0 {
            vmm_costs(&mut src);
        }
        let psk = Psk::random().expect("psk");
        let mcfg = MigrationConfig::new(psk)
            .with_transport(TransportKind::Tcp)
            .with_downtime_limit(Duration::from_millis(arg(4, 10)));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let dcfg = mcfg.clone();
        let dest = std::thread::spawn(move || {
            accept(
                &listener,
                &dcfg,
                kvm_destination_factory(KvmDestConfig::default()),
            )
            .map(|(vm, r)| (into_kvm(vm).expect("kvm"), r))
        });
        let report = migrate(&mut src, addr, &mcfg, &mut |_| {}).expect("migrate");
        let (mut dst, dreport) = dest.join().expect("join").expect("accept");
        let check = dst.self_check().expect("self-check");
        println!(
            "run {run}: start {:.0} ms, total {:.0} ms, rounds {}, downtime {:.2} ms, dest resume {:.2} ms, \
             verified {}, vCPU state equal {}, guest check ok {} ({} pages)",
            started.as_secs_f64() * 1e3,
            report.total_ms,
            report.rounds,
            report.downtime_ms,
            dreport.resume_ms,
            report.verified,
            src.vcpu_state_digest() == dst.vcpu_state_digest(),
            check.ok(),
            check.pages_checked,
        );
        for r in &report.per_round {
            println!(
                "  round {:2} final={} pages {:7} {:7.1} ms dirty {:6}",
                r.round, r.final_round, r.pages, r.ms, r.dirty_pages
            );
        }
        src.stop();
        dst.stop();
    }
}

/// Median cost of the VMM's switchover steps, measured 20 times on the running guest.
fn vmm_costs(vm: &mut KvmVm) {
    let mut t = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    let mut set = PageSet::empty(vm.memory());
    vm.start_dirty_log().expect("log");
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(20));
        let a = Instant::now();
        vm.pause().expect("pause");
        let b = Instant::now();
        set.clear();
        vm.fetch_and_clear_dirty(&mut set).expect("fetch");
        let c = Instant::now();
        vm.save_state().expect("save");
        let d = Instant::now();
        SourceVm::resume(vm).expect("resume");
        let e = Instant::now();
        for (v, x) in t.iter_mut().zip([b - a, c - b, d - c, e - d]) {
            v.push(x.as_secs_f64() * 1e6);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "VMM medians over 20: pause {:.0} us, dirty-log fetch {:.0} us ({} pages), save_state {:.0} us, resume {:.0} us",
        med(&mut t[0]),
        med(&mut t[1]),
        set.count(),
        med(&mut t[2]),
        med(&mut t[3])
    );
}
