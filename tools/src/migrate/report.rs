//! Progress on a terminal, the summary table, and the JSON object.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use rdmig_transport::session::{
    DestReport, MigrationMode, MigrationReport, Progress as Snapshot, RoundStats,
};
use rdmig_vmm::GuestCheck;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::qemu::{DestQemuFacts, QemuFacts};
use super::vms::{VmKind, VmParams};
use crate::units::human_bytes;

/// What the destination reports back (written by the child in loopback mode).
#[derive(Debug, Serialize, Deserialize)]
pub struct DestOutcome {
    /// The incoming migration completed.
    pub ok: bool,
    /// `completed`, `failed` or `cancelled`.
    #[serde(default)]
    pub outcome: String,
    /// Why not.
    pub error: Option<String>,
    /// VM kind.
    pub vm: String,
    /// The destination's figures.
    pub dest: Option<DestReport>,
    /// The guest's self-check after resume.
    pub guest_check: Option<GuestCheckJson>,
    /// The guest was running when checked.
    pub guest_running: bool,
    /// The guest's own verdict on its resume, as this end saw it: its self-check, or (QEMU) the
    /// test guest's console reports. `None`: nothing here to tell it by.
    #[serde(default)]
    pub guest_verified: Option<bool>,
    /// The destination QEMU's facts (`--vm qemu`).
    #[serde(default)]
    pub qemu: Option<DestQemuFacts>,
}

/// [`GuestCheck`] as it crosses the process boundary.
pub type GuestCheckJson = GuestCheckWire;

/// Serializable mirror of [`GuestCheck`].
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct GuestCheckWire {
    /// Pages checked.
    pub pages_checked: u64,
    /// Pages skipped (rewritten during the check).
    pub pages_skipped: u64,
    /// Bad pages.
    pub pages_bad: u64,
    /// First bad page.
    pub first_bad: Option<u64>,
}

impl GuestCheckWire {
    /// True when no page was bad and some were checked.
    pub fn ok(&self) -> bool {
        self.pages_bad == 0 && self.pages_checked > 0
    }
}

impl From<GuestCheck> for GuestCheckWire {
    fn from(c: GuestCheck) -> Self {
        GuestCheckWire {
            pages_checked: c.pages_checked,
            pages_skipped: c.pages_skipped,
            pages_bad: c.pages_bad,
            first_bad: c.first_bad,
        }
    }
}

/// Per-round progress on a terminal (silent otherwise).
pub struct Progress {
    bar: Option<ProgressBar>,
    verbose: bool,
}

impl Progress {
    /// A progress display if stderr is a terminal and `enabled`.
    pub fn new(enabled: bool) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let bar = (enabled && tty).then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                    .expect("static template"),
            );
            b.enable_steady_tick(Duration::from_millis(100));
            b
        });
        Progress {
            bar,
            verbose: enabled,
        }
    }

    /// Announces the migration.
    pub fn start(&self, kind: VmKind, why: &str, p: &VmParams) {
        let line = format!(
            "migrating a {} {} VM ({why}), working set {}, dirty rate {}/s",
            human_bytes(p.mem),
            kind.name(),
            human_bytes(p.working_set),
            human_bytes(p.dirty_rate)
        );
        self.line(&line);
        if let Some(b) = &self.bar {
            b.set_message("round 0: sending all memory");
        }
    }

    fn line(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None if self.verbose => eprintln!("{s}"),
            None => {}
        }
    }

    /// One round finished.
    pub fn round(&self, r: &RoundStats) {
        let line = if r.final_round {
            format!(
                "  round {:>3} (stop-and-copy): {:>8} pages {:>10} in {:>8.1} ms",
                r.round,
                r.pages,
                human_bytes(r.bytes),
                r.ms
            )
        } else {
            format!(
                "  round {:>3}: {:>8} pages {:>10} in {:>8.1} ms ({:>7.0} MiB/s), guest dirtied {:>6.0} MiB/s, predicted downtime {:.1} ms",
                r.round,
                r.pages,
                human_bytes(r.bytes),
                r.ms,
                r.mib_s,
                r.dirty_rate_mib_s,
                r.predicted_downtime_ms
            )
        };
        self.line(&line);
        if let Some(b) = &self.bar {
            b.set_message(format!(
                "round {}: {} dirty pages to send",
                r.round + 1,
                r.dirty_pages
            ));
        }
    }

    /// Clears the spinner.
    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// Prints a finished migration as a table or JSON.
pub fn print_migration(
    rep: &MigrationReport,
    kind: VmKind,
    dest: Option<&DestOutcome>,
    qemu: Option<&QemuFacts>,
    json: bool,
) {
    let check = dest.and_then(|d| d.guest_check.clone());
    // Every verdict this end knows: the source's from both consoles (QEMU, loopback), the
    // destination's own (its self-check, or its console alone).
    let dest_verified = dest.and_then(|d| d.guest_verified);
    let verdicts: Vec<bool> = [
        qemu.and_then(|q| q.guest_verified),
        dest_verified,
        check.as_ref().map(|c| c.ok()),
    ]
    .into_iter()
    .flatten()
    .collect();
    let guest_verified = (!verdicts.is_empty()).then(|| verdicts.iter().all(|&v| v));
    let dest_qemu = dest.and_then(|d| d.qemu.as_ref());
    if json {
        let v = json!({
            "outcome": "completed",
            "transport": rep.transport,
            "transport_reason": rep.transport_reason,
            "tls": rep.tls,
            "dest_tls": dest.and_then(|d| d.dest.as_ref()).map(|d| d.tls.clone()),
            "vm": kind.name(),
            "mem_bytes": rep.mem_bytes,
            "page_size": rep.page_size,
            "total_ms": rep.total_ms,
            "setup_ms": rep.setup_ms,
            "downtime_ms": rep.downtime_ms,
            "switchover_ms": rep.switchover_ms,
            "rounds": rep.rounds,
            "bytes_transferred": rep.bytes_transferred,
            "zero_pages": rep.zero_pages,
            "dest_zeroed_pages": dest.and_then(|d| d.dest.as_ref()).map(|d| d.zeroed_pages),
            "throughput_mib_s": rep.throughput_mib_s,
            "verified": rep.verified,
            "digest": rep.digest,
            "guest_verified": guest_verified,
            "dest_guest_verified": dest_verified,
            "dest_qemu": dest_qemu,
            "dirty_tracking": qemu.map(|q| q.dirty_tracking),
            "qemu_state_bytes": qemu.map(|q| q.qemu_state_bytes),
            "qemu": qemu,
            "guest_check": check,
            "source_cpu_ms": rep.source_cpu_ms,
            "dest_cpu_ms": rep.dest_cpu_ms,
            "forced_switchover": rep.forced_switchover,
            "device_state_bytes": rep.device_state_bytes,
            "per_round": rep.per_round,
            "mode": rep.mode,
            "postcopy": rep.postcopy,
            "postcopy_pages": rep.postcopy_pages,
            "postcopy_faults": rep.postcopy_faults,
            "postcopy_fault_pages": rep.postcopy_fault_pages,
            "postcopy_ms": rep.postcopy_ms,
            "recoveries": rep.recoveries,
            "recovery_pauses_ms": rep.recovery_pauses_ms,
            "fault_latency_us": rep.fault_latency_us,
            "postcopy_zero_copy": dest.and_then(|d| d.dest.as_ref()).map(|d| d.postcopy_zero_copy),
        });
        println!("{v}");
        return;
    }
    println!(
        "\nrdmig live migration of a {} {} VM over {} ({}){}",
        human_bytes(rep.mem_bytes),
        kind.name(),
        rep.transport,
        rep.transport_reason,
        match rep.tls.as_str() {
            "" => String::new(),
            t if rep.transport == "rdma" => {
                format!("; control connection in TLS ({t}), RDMA READs not encrypted")
            }
            t => format!("; in TLS ({t})"),
        }
    );
    if rep.per_round.is_empty() {
        println!("  (no pre-copy round: every page moved after the switchover)");
    } else {
        println!(
            "{:>6} {:>9} {:>9} {:>11} {:>9} {:>9} {:>12} {:>13}",
            "round", "pages", "zero", "MiB", "ms", "MiB/s", "dirty MiB/s", "predicted ms"
        );
    }
    for r in &rep.per_round {
        let name = if r.final_round {
            format!("{}*", r.round)
        } else {
            r.round.to_string()
        };
        println!(
            "{:>6} {:>9} {:>9} {:>11.1} {:>9.1} {:>9.0} {:>12.0} {:>13.1}",
            name,
            r.pages,
            r.zero_pages,
            r.bytes as f64 / (1u64 << 20) as f64,
            r.ms,
            r.mib_s,
            r.dirty_rate_mib_s,
            r.predicted_downtime_ms
        );
    }
    if rep.per_round.iter().any(|r| r.final_round) {
        println!("  (* = stop-and-copy round, source paused)");
    }
    println!(
        "{:<18} {:.1} ms (setup {:.1} ms)",
        "total time", rep.total_ms, rep.setup_ms
    );
    println!(
        "{:<18} {}{}",
        "mode",
        rep.mode,
        if rep.postcopy {
            ", switched over in post-copy"
        } else {
            ""
        }
    );
    if rep.postcopy {
        let l = &rep.fault_latency_us;
        println!(
            "{:<18} {} pages fetched after resume in {:.1} ms; {} faults ({} pages), the rest prefetched",
            "post-copy", rep.postcopy_pages, rep.postcopy_ms, rep.postcopy_faults, rep.postcopy_fault_pages
        );
        println!(
            "{:<18} p50 {:.1} µs, p90 {:.1}, p99 {:.1}, p99.9 {:.1}, max {:.1}",
            "fault latency", l.p50, l.p90, l.p99, l.p999, l.max
        );
        if rep.recoveries > 0 {
            let pauses: Vec<String> = rep
                .recovery_pauses_ms
                .iter()
                .map(|p| format!("{p:.1} ms"))
                .collect();
            println!(
                "{:<18} {} link failures recovered; paused {}",
                "recovery",
                rep.recoveries,
                pauses.join(", ")
            );
        }
    }
    println!(
        "{:<18} {:.2} ms{}",
        "downtime",
        rep.downtime_ms,
        if rep.forced_switchover {
            " (switchover forced: pre-copy did not converge)"
        } else {
            ""
        }
    );
    println!(
        "{:<18} {} in {} rounds, {:.0} MiB/s; {} zero pages sent as ranges",
        "transferred",
        human_bytes(rep.bytes_transferred),
        rep.rounds,
        rep.throughput_mib_s,
        rep.zero_pages
    );
    println!(
        "{:<18} {} (xxh3-128 {})",
        "memory digest",
        if rep.verified {
            "verified, both ends match"
        } else {
            "MISMATCH"
        },
        rep.digest
    );
    if let Some(q) = qemu {
        println!(
            "{:<18} {} ({}); final fetch after stop {:.1} ms; QEMU's own stream {} bytes",
            "dirty tracking",
            q.dirty_tracking,
            q.tracking_reason,
            q.final_fetch_ms.unwrap_or(0.0),
            q.qemu_state_bytes
        );
        match (&q.guest, &q.guest_error) {
            (Some(c), _) => println!(
                "{:<18} passed: bad=0 on the destination, generation {} -> {} ({} reports)",
                "guest self-check", c.source_gen, c.dest_last_gen, c.dest_reports
            ),
            (None, Some(e)) => println!("{:<18} FAILED: {e}", "guest self-check"),
            (None, None) => println!(
                "{:<18} not available here (the destination's console is on another host; \
                 the destination reports its own verdict)",
                "guest self-check"
            ),
        }
        if let Some(d) = dest_qemu {
            print_dest_guest(d);
        }
    }
    match &check {
        _ if qemu.is_some() => {}
        Some(c) => println!(
            "{:<18} {} ({} pages checked, {} rewritten meanwhile, {} bad)",
            "guest self-check",
            if c.ok() {
                "passed on the destination"
            } else {
                "FAILED"
            },
            c.pages_checked,
            c.pages_skipped,
            c.pages_bad
        ),
        None => println!(
            "{:<18} not available (destination on another host)",
            "guest self-check"
        ),
    }
    println!(
        "{:<18} source {:.0} ms, destination {:.0} ms",
        "migration CPU", rep.source_cpu_ms, rep.dest_cpu_ms
    );
}

/// Prints a cancelled migration's JSON object: what the source had done when it ended (`p`),
/// its VM's state (`running`; `None`: none had started) and, with --loopback, the
/// destination's outcome.
pub fn print_cancelled(
    p: &Snapshot,
    kind: Option<VmKind>,
    mode: MigrationMode,
    running: Option<bool>,
    dest: Option<&DestOutcome>,
) {
    let v = json!({
        "outcome": "cancelled",
        "vm": kind.map(VmKind::name),
        "mode": mode.name(),
        "mem_bytes": p.total_bytes,
        "total_ms": p.elapsed.as_secs_f64() * 1e3,
        "round": p.round,
        "bytes_transferred": p.transferred_bytes,
        "zero_pages": p.zero_pages,
        "source_running": running,
        "dest_outcome": dest.map(|d| d.outcome.as_str()),
        "dest_error": dest.and_then(|d| d.error.as_deref()),
    });
    println!("{v}");
}

/// Prints the destination's outcome (listen mode on its own host).
pub fn print_destination(o: &DestOutcome, json: bool) {
    if json {
        println!("{}", serde_json::to_string(o).unwrap_or_default());
        return;
    }
    match (&o.dest, &o.guest_check) {
        (Some(d), None) if o.qemu.is_some() => {
            println!(
                "incoming migration complete ({}): {} in {} rounds over {}, resume took {:.2} ms",
                d.mode,
                human_bytes(d.bytes),
                d.rounds,
                d.transport,
                d.resume_ms
            );
            if let Some(q) = &o.qemu {
                println!("QEMU's own stream: {} bytes", q.qemu_state_bytes);
                print_dest_guest(q);
            }
        }
        (Some(d), Some(c)) => {
            println!(
                "incoming migration complete ({}): {} in {} rounds over {}, resume took {:.2} ms; guest self-check {} ({} pages)",
                d.mode,
                human_bytes(d.bytes),
                d.rounds,
                d.transport,
                d.resume_ms,
                if c.ok() { "passed" } else { "FAILED" },
                c.pages_checked
            );
            if d.postcopy_pages > 0 {
                let l = &d.fault_latency_us;
                println!(
                    "post-copy: {} pages after resume in {:.1} ms, {} faults, fault latency p50 {:.1} µs, p99 {:.1}, max {:.1}",
                    d.postcopy_pages, d.postcopy_ms, d.postcopy_faults, l.p50, l.p99, l.max
                );
            }
            if d.recoveries > 0 {
                println!(
                    "post-copy recovered from {} link failures (paused {:?} ms)",
                    d.recoveries, d.recovery_pauses_ms
                );
            }
        }
        _ => println!(
            "incoming migration failed: {}",
            o.error.as_deref().unwrap_or("unknown")
        ),
    }
}

/// The destination's own verdict on a QEMU test guest.
fn print_dest_guest(q: &DestQemuFacts) {
    match (&q.guest, &q.guest_error) {
        (Some(r), _) => println!(
            "{:<18} passed on the destination's console: bad=0, generation {} -> {}, {} -> {} pages verified ({} reports)",
            "destination check", r.first_gen, r.last_gen, r.first_ok, r.last_ok, r.reports
        ),
        (None, Some(e)) => println!("{:<18} FAILED: {e}", "destination check"),
        (None, None) => println!(
            "{:<18} not available (no --qemu-console on the destination)",
            "destination check"
        ),
    }
}
