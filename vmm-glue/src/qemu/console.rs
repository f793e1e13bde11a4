//! The project's test guest reports on its serial console (see `vmm-glue/guest/rdmig-guest.c`):
//! `RDMIG-GUEST ok=<pages verified> bad=<pages wrong> gen=<pass> ...` once a second, and
//! `RDMIG-GUEST-BAD ...` for the first wrong pages. [`check_continuation`] decides whether a
//! migrated guest went on running intact from both consoles; [`check_resumed`] decides what the
//! destination's console alone can show (the destination host does not see the source's).

/// One `RDMIG-GUEST` report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestReport {
    /// Pages verified so far.
    pub ok: u64,
    /// Pages found wrong so far.
    pub bad: u64,
    /// The pass the guest is writing.
    pub gen: u64,
}

/// The reports in a console log, in order.
pub fn reports(text: &str) -> Vec<GuestReport> {
    text.lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("RDMIG-GUEST ")?;
            let field = |k: &str| {
                rest.split_whitespace()
                    .find_map(|f| f.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
            };
            Some(GuestReport {
                ok: field("ok")?,
                bad: field("bad")?,
                gen: field("gen")?,
            })
        })
        .collect()
}

/// The `RDMIG-GUEST-BAD` lines of a console log.
pub fn bad_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.contains("RDMIG-GUEST-BAD") || l.contains("RDMIG-GUEST-FAIL"))
        .map(|l| l.trim().to_string())
        .collect()
}

/// What the destination's console showed after a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Continuation {
    /// The source's last report before the switchover.
    pub source_gen: u64,
    /// Pages the guest had verified by then.
    pub source_ok: u64,
    /// The destination's first and last report.
    pub dest_first_gen: u64,
    /// The destination's last generation.
    pub dest_last_gen: u64,
    /// Pages verified by the destination's last report.
    pub dest_ok: u64,
    /// Reports seen on the destination.
    pub dest_reports: usize,
}

/// What the destination's console alone showed after a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resumed {
    /// The first report after the resume.
    pub first_gen: u64,
    /// Pages verified by the first report (the counters moved with the guest).
    pub first_ok: u64,
    /// The last report's generation.
    pub last_gen: u64,
    /// Pages verified by the last report.
    pub last_ok: u64,
    /// Reports seen.
    pub reports: usize,
}

/// Checks, from the destination's console alone (only what the guest printed after the
/// resume), that the guest resumed intact: at least `min_reports` reports, all `bad=0`, no bad
/// page lines, no sign of a fresh boot (the init or start lines: a guest that resumed never
/// prints them again), counters that came with the guest (the first report has verified
/// pages already) and go on (more pages verified, generations never going back).
pub fn check_resumed(dest: &str, min_reports: usize) -> Result<Resumed, String> {
    let bad = bad_lines(dest);
    if !bad.is_empty() {
        return Err(format!("the guest found bad pages: {}", bad.join("; ")));
    }
    if let Some(l) = dest.lines().find(|l| {
        let l = l.trim();
        l.starts_with("RDMIG-GUEST-INIT") || l.starts_with("RDMIG-GUEST start")
    }) {
        return Err(format!(
            "the guest booted afresh on the destination instead of resuming ({:?})",
            l.trim()
        ));
    }
    let d = reports(dest);
    if d.len() < min_reports.max(1) {
        return Err(format!(
            "the destination console has {} RDMIG-GUEST reports, {} expected",
            d.len(),
            min_reports.max(1)
        ));
    }
    if let Some(r) = d.iter().find(|r| r.bad != 0) {
        return Err(format!("the destination guest reports bad={}", r.bad));
    }
    let (first, last) = (d[0], d[d.len() - 1]);
    if first.ok == 0 {
        return Err(
            "the destination guest's first report has verified no page: its counters did not \
             come with it"
                .into(),
        );
    }
    if d.windows(2)
        .any(|w| w[1].gen < w[0].gen || w[1].ok < w[0].ok)
    {
        return Err("the destination guest's counters went back".into());
    }
    if last.ok <= first.ok {
        return Err(format!(
            "the destination guest verified no page after the move (ok={} throughout)",
            last.ok
        ));
    }
    Ok(Resumed {
        first_gen: first.gen,
        first_ok: first.ok,
        last_gen: last.gen,
        last_ok: last.ok,
        reports: d.len(),
    })
}

/// Checks that the guest went on where the source left it: the destination reports `bad=0`,
/// no bad page lines, counters that continue the source's (not restarted), and progress (at
/// least `min_reports` reports, pages verified after the move). Err says what is wrong.
pub fn check_continuation(
    source: &str,
    dest: &str,
    min_reports: usize,
) -> Result<Continuation, String> {
    let src = reports(source);
    let last_src = *src
        .last()
        .ok_or("the source console has no RDMIG-GUEST report (did the guest boot?)")?;
    let bad = bad_lines(source)
        .into_iter()
        .chain(bad_lines(dest))
        .collect::<Vec<_>>();
    if !bad.is_empty() || last_src.bad != 0 {
        return Err(format!(
            "the guest found bad pages: {} (source reports bad={})",
            bad.join("; "),
            last_src.bad
        ));
    }
    let d = reports(dest);
    if d.len() < min_reports {
        return Err(format!(
            "the destination console has {} RDMIG-GUEST reports, {min_reports} expected",
            d.len()
        ));
    }
    let (first, last) = (d[0], d[d.len() - 1]);
    if let Some(r) = d.iter().find(|r| r.bad != 0) {
        return Err(format!("the destination guest reports bad={}", r.bad));
    }
    if first.gen < last_src.gen || first.ok < last_src.ok {
        return Err(format!(
            "the destination guest did not continue the source's run: source gen={} ok={}, \
             destination starts at gen={} ok={}",
            last_src.gen, last_src.ok, first.gen, first.ok
        ));
    }
    if last.ok <= first.ok {
        return Err(format!(
            "the destination guest verified no page after the move (ok={} throughout)",
            last.ok
        ));
    }
    Ok(Continuation {
        source_gen: last_src.gen,
        source_ok: last_src.ok,
        dest_first_gen: first.gen,
        dest_last_gen: last.gen,
        dest_ok: last.ok,
        dest_reports: d.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "RDMIG-GUEST-INIT up\nRDMIG-GUEST start ws=32 rate=16 pages=8192\n\
                       RDMIG-GUEST ok=4097 bad=0 gen=1 ws=8192 rate=16384\n\
                       RDMIG-GUEST ok=8193 bad=0 gen=2 ws=8192 rate=16384\n";

    #[test]
    fn parses_reports_and_checks_continuation() {
        assert_eq!(
            reports(SRC),
            vec![
                GuestReport {
                    ok: 4097,
                    bad: 0,
                    gen: 1
                },
                GuestReport {
                    ok: 8193,
                    bad: 0,
                    gen: 2
                }
            ]
        );
        let good =
            "RDMIG-GUEST ok=9000 bad=0 gen=2 ws=8192\nRDMIG-GUEST ok=13000 bad=0 gen=3 ws=8192\n";
        let c = check_continuation(SRC, good, 2).unwrap();
        assert_eq!((c.source_gen, c.dest_last_gen), (2, 3));
        // Restarted counters, bad pages, no progress: each refused.
        let restarted = "RDMIG-GUEST ok=10 bad=0 gen=1\nRDMIG-GUEST ok=4000 bad=0 gen=1\n";
        assert!(check_continuation(SRC, restarted, 2).is_err());
        let bad = "RDMIG-GUEST-BAD page=3 want=1 got=0\nRDMIG-GUEST ok=9000 bad=1 gen=2\nRDMIG-GUEST ok=9100 bad=1 gen=2\n";
        assert!(check_continuation(SRC, bad, 2).unwrap_err().contains("bad"));
        let stuck = "RDMIG-GUEST ok=9000 bad=0 gen=2\nRDMIG-GUEST ok=9000 bad=0 gen=2\n";
        assert!(check_continuation(SRC, stuck, 2).is_err());
        assert!(check_continuation(SRC, good, 3).is_err());
    }

    #[test]
    fn checks_a_resumed_guest_from_its_console_alone() {
        let good =
            "RDMIG-GUEST ok=9000 bad=0 gen=2 ws=8192\nRDMIG-GUEST ok=13000 bad=0 gen=3 ws=8192\n";
        let r = check_resumed(good, 2).unwrap();
        assert_eq!((r.first_ok, r.last_gen, r.reports), (9000, 3, 2));
        assert!(check_resumed(good, 3)
            .unwrap_err()
            .contains("2 RDMIG-GUEST reports"));
        // A fresh boot, bad pages, counters that start at nothing, go back or stand still.
        let booted = format!("RDMIG-GUEST-INIT up\nRDMIG-GUEST start ws=32\n{good}");
        assert!(check_resumed(&booted, 2).unwrap_err().contains("afresh"));
        let bad = "RDMIG-GUEST-BAD page=3 want=1 got=0\nRDMIG-GUEST ok=9000 bad=1 gen=2\nRDMIG-GUEST ok=9100 bad=1 gen=2\n";
        assert!(check_resumed(bad, 2).unwrap_err().contains("bad"));
        let fresh = "RDMIG-GUEST ok=0 bad=0 gen=1\nRDMIG-GUEST ok=4000 bad=0 gen=1\n";
        assert!(check_resumed(fresh, 2).is_err());
        let back = "RDMIG-GUEST ok=9000 bad=0 gen=3\nRDMIG-GUEST ok=9500 bad=0 gen=2\n";
        assert!(check_resumed(back, 2).unwrap_err().contains("back"));
        let stuck = "RDMIG-GUEST ok=9000 bad=0 gen=2\nRDMIG-GUEST ok=9000 bad=0 gen=2\n";
        assert!(check_resumed(stuck, 2).is_err());
    }
}
