//! A synthetic VM for hosts and tests without KVM.
//!
//! Guest memory of a given size (one or more regions), writer threads that dirty pages of a
//! working set at a target rate, a dirty bitmap of its own, pause/resume that stop and
//! restart the writers, and a page content scheme that lets the destination check every page:
//! page `p` at generation `g` holds words derived from `(p, g)` only (module `content`), and the
//! device state carries every page's generation. On the destination the writers resume from
//! the generations they left off at.

mod content;
pub mod state;
mod vm;
mod writer;

pub use content::{fill_page, page_matches};
pub use vm::{synthetic_destination_factory, SyntheticConfig, SyntheticVm, KIND};
