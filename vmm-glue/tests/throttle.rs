//! Throttling through the migration seam (`SourceVm::throttle`, QEMU's auto-converge idea):
//! the dirty rate the dirty log shows for the synthetic VM (its writers sleep a share of each
//! time slice) and for the KVM guest (vCPU pacing) at 50 % and 90 % throttle falls clearly
//! below the unthrottled rate measured in the same run, and `throttle(0)` restores it. Values
//! above 99 % are refused. The KVM half is skipped, visibly, where `/dev/kvm` is not usable.
//!
//! Only ratios within one run are compared (these are shared two-core machines): 50 % should
//! give about half the rate, 90 % about a tenth; the bounds leave room for a busy host.

use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use rdmig_transport::mem::PageSize;
use rdmig_transport::pages::PageSet;
use rdmig_transport::require::{skip, Capability};
use rdmig_transport::vm::SourceVm;
use rdmig_vmm::kvm::{kvm_available, KvmConfig, KvmVm};
use rdmig_vmm::synthetic::{SyntheticConfig, SyntheticVm};

const MIB: u64 = 1 << 20;
/// How long each rate is measured.
const WINDOW: Duration = Duration::from_millis(1000);

/// The tests of this file measure time: one at a time.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Dirty pages per second the dirty log shows over [`WINDOW`] (the log is cleared first).
fn dirty_rate(vm: &mut dyn SourceVm) -> f64 {
    let mut set = PageSet::empty(vm.memory());
    vm.fetch_and_clear_dirty(&mut set).unwrap();
    set.clear();
    let t = Instant::now();
    thread::sleep(WINDOW);
    vm.fetch_and_clear_dirty(&mut set).unwrap();
    set.count() as f64 / t.elapsed().as_secs_f64()
}

/// Measures the rate unthrottled, at 50 % and 90 %, and after `throttle(0)`; checks the
/// ratios and that 100 % is refused. Returns the four rates.
fn check_throttling(what: &str, vm: &mut dyn SourceVm) -> [f64; 4] {
    vm.start_dirty_log().unwrap();
    let base = dirty_rate(vm);
    vm.throttle(50).unwrap();
    let half = dirty_rate(vm);
    vm.throttle(90).unwrap();
    let tenth = dirty_rate(vm);
    let refused = vm.throttle(100).unwrap_err().to_string();
    vm.throttle(0).unwrap();
    let restored = dirty_rate(vm);
    eprintln!(
        "{what}: dirty pages/s unthrottled {base:.0}, at 50% {half:.0} ({:.2}), at 90% {tenth:.0} \
         ({:.2}), after throttle(0) {restored:.0} ({:.2})",
        half / base,
        tenth / base,
        restored / base
    );
    assert!(
        base > 500.0,
        "{what}: the unthrottled guest hardly dirtied ({base:.0}/s)"
    );
    assert!(
        half < 0.75 * base,
        "{what}: 50% throttle left {half:.0} of {base:.0}/s"
    );
    assert!(
        tenth < 0.35 * base,
        "{what}: 90% throttle left {tenth:.0} of {base:.0}/s"
    );
    assert!(
        tenth < half,
        "{what}: 90% ({tenth:.0}/s) not below 50% ({half:.0}/s)"
    );
    assert!(
        restored > 0.7 * base,
        "{what}: throttle(0) gave {restored:.0} of {base:.0}/s"
    );
    assert!(refused.contains("at most 99%"), "{what}: {refused}");
    [base, half, tenth, restored]
}

#[test]
fn throttling_slows_the_synthetic_writers_and_zero_restores_them() {
    let _one = one_at_a_time();
    // 16 MiB/s = 4096 pages/s over a 64 MiB (16384 page) working set: few pages twice in 1 s.
    let cfg = SyntheticConfig::new(64 * MIB).with_dirtying(64 * MIB, 16 * MIB);
    let mut vm = SyntheticVm::start(&cfg).unwrap();
    check_throttling("synthetic VM", &mut vm);
    let check = vm.verify();
    assert!(check.ok(), "{check:?}");
    vm.stop();
}

#[test]
fn throttling_paces_the_kvm_vcpu_and_zero_restores_it() {
    let _one = one_at_a_time();
    if let Err(why) = kvm_available() {
        skip(
            Capability::Kvm,
            "throttling_paces_the_kvm_vcpu_and_zero_restores_it",
            format!("/dev/kvm not usable: {why}"),
        );
        return;
    }
    // 16 MiB/s = 4096 pages/s into a 32 MiB (8192 page) working set, which the guest walks in
    // order: no page twice in 1 s.
    let cfg = KvmConfig {
        mem_bytes: 64 * MIB,
        working_set: 32 * MIB,
        dirty_rate: 16 * MIB,
        page_size: PageSize::KIB4,
        memfd: false,
        populated: None,
    };
    let mut vm = KvmVm::start(&cfg).unwrap();
    check_throttling("KVM guest", &mut vm);
    assert!(vm.self_check().unwrap().ok());
    vm.stop();
}
