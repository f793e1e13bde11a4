//! What a destination hands back when post-copy lost its source: the checks every link-cut
//! test makes on it.

use rdmig_transport::postcopy::PostcopyRemnant;
use rdmig_transport::Error;

/// Checks that the destination failed with `PostcopyInterrupted` for a guest of `mem_bytes`
/// (4 KiB pages), some but not all pages missing, and that the paused guest is handed back
/// once, with that count and all its memory. Returns it.
pub fn expect_remnant(de: Error, mem_bytes: u64) -> PostcopyRemnant {
    eprintln!("cut during post-copy: {de}");
    assert!(de.to_string().contains("pages still on the source"), "{de}");
    let Error::PostcopyInterrupted {
        missing,
        total,
        guest,
        ..
    } = de
    else {
        panic!("not PostcopyInterrupted: {de}")
    };
    assert_eq!(total, mem_bytes / 4096);
    assert!(
        missing > 0 && missing < total,
        "{missing} of {total} missing"
    );
    let remnant = guest.take().expect("the paused guest is handed back");
    assert!(guest.take().is_none(), "taken once");
    assert_eq!(remnant.missing(), missing);
    assert_eq!(remnant.vm().memory().total_bytes(), mem_bytes);
    remnant
}
