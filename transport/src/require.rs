//! Capability gates for tests that need hardware or privileges.
//!
//! A test that cannot run on the host it finds itself on calls [`skip`] with the capability it
//! lacks and why, then returns. On a laptop that prints a visible `SKIP:` line and the test
//! passes. Where the capability is *required* — `RDMIG_REQUIRE` names it, as CI does for what its
//! machines have — the same call panics instead, so a broken harness cannot show up as green:
//!
//! ```text
//! RDMIG_REQUIRE=kvm,uffd,uffd-minor,qemu   # the host tests in CI
//! RDMIG_REQUIRE=rdma,uffd,uffd-minor       # inside the SoftRoCE guest
//! RDMIG_REQUIRE=all                        # every capability
//! ```
//!
//! An unknown name in `RDMIG_REQUIRE` panics too (a typo must not turn a requirement off).

use std::fmt;
use std::io::Write;

/// What a gated test needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    /// A working `/dev/kvm`.
    Kvm,
    /// userfaultfd (missing-page faults on anonymous memory).
    Uffd,
    /// userfaultfd minor faults on shmem (zero-copy post-copy into memfd memory).
    UffdMinor,
    /// A usable RDMA device (the SoftRoCE guest sets `RDMIG_RXE_DEV`).
    Rdma,
    /// A `qemu-system-x86_64` and the project's Linux guest image (`RDMIG_QEMU`).
    Qemu,
    /// Soft-dirty page tracking (`CONFIG_MEM_SOFT_DIRTY`).
    SoftDirty,
    /// Kernel TLS (the `tls` TCP ULP).
    Ktls,
}

impl Capability {
    /// Every capability, in the order `RDMIG_REQUIRE=all` lists them.
    pub const ALL: [Capability; 7] = [
        Capability::Kvm,
        Capability::Uffd,
        Capability::UffdMinor,
        Capability::Rdma,
        Capability::Qemu,
        Capability::SoftDirty,
        Capability::Ktls,
    ];

    /// The name used in `RDMIG_REQUIRE`.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Kvm => "kvm",
            Capability::Uffd => "uffd",
            Capability::UffdMinor => "uffd-minor",
            Capability::Rdma => "rdma",
            Capability::Qemu => "qemu",
            Capability::SoftDirty => "soft-dirty",
            Capability::Ktls => "ktls",
        }
    }

    fn from_name(name: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The capabilities `RDMIG_REQUIRE` names (an error for an unknown name).
pub fn required() -> Result<Vec<Capability>, String> {
    parse(&std::env::var("RDMIG_REQUIRE").unwrap_or_default())
}

fn parse(spec: &str) -> Result<Vec<Capability>, String> {
    let mut out = Vec::new();
    for name in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if name == "all" {
            out.extend(Capability::ALL);
            continue;
        }
        match Capability::from_name(name) {
            Some(c) => out.push(c),
            None => {
                let known: Vec<_> = Capability::ALL.iter().map(|c| c.name()).collect();
                return Err(format!(
                    "RDMIG_REQUIRE names an unknown capability {name:?} (known: {}, all)",
                    known.join(", ")
                ));
            }
        }
    }
    Ok(out)
}

/// Whether `cap` is required here (panics on a malformed `RDMIG_REQUIRE`).
pub fn is_required(cap: Capability) -> bool {
    match required() {
        Ok(list) => list.contains(&cap),
        Err(e) => panic!("{e}"),
    }
}

/// Skips the calling test for lack of `cap`: prints `SKIP: <test>: <why>` to stderr, or panics
/// with `REQUIRED <cap> missing` when `RDMIG_REQUIRE` names `cap`. The caller returns after it.
#[track_caller]
pub fn skip(cap: Capability, test: &str, why: impl fmt::Display) {
    if is_required(cap) {
        panic!("REQUIRED {cap} missing: {test}: {why} (RDMIG_REQUIRE names {cap}; a CI machine must have it)");
    }
    // Straight to stderr (not the test harness's captured output) so a plain `cargo test` shows it.
    let _ = writeln!(std::io::stderr(), "SKIP: {test}: {why}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_all_and_rejects_typos() {
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(
            parse("kvm, uffd-minor").unwrap(),
            vec![Capability::Kvm, Capability::UffdMinor]
        );
        assert_eq!(parse("all").unwrap(), Capability::ALL.to_vec());
        let err = parse("kvm,rmda").unwrap_err();
        assert!(err.contains("\"rmda\""), "{err}");
    }
}
