//! The userfaultfd check post-copy tests start with: skipped, with the reason, where it is
//! unavailable (and failed under `RDMIG_REQUIRE`, as every skip).

use rdmig_transport::postcopy::Uffd;
use rdmig_transport::require::{skip, Capability};

/// True if userfaultfd works here; else records the skip of the calling test and is false.
pub fn uffd_ok() -> bool {
    match Uffd::probe() {
        Ok(()) => true,
        Err(e) => {
            let test = std::thread::current()
                .name()
                .unwrap_or("post-copy")
                .to_string();
            skip(
                Capability::Uffd,
                &test,
                format!("userfaultfd unavailable: {e}"),
            );
            false
        }
    }
}
