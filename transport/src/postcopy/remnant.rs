//! What an interrupted post-copy leaves on the destination: the paused guest, its memory with
//! the pages that arrived, and the userfaultfd registration that keeps the other pages
//! missing (so nothing reads them as zeroes by mistake). Handed to the caller inside
//! [`crate::Error::PostcopyInterrupted`], in a [`PausedGuest`] slot (defined with the error,
//! which does not depend on this module; its typed `take` is here).

use std::sync::{Arc, Mutex};

use super::service::PostcopyService;
use crate::vm::DestinationVm;

/// The paused destination guest after an interrupted post-copy.
pub struct PostcopyRemnant {
    // Field order is drop order: the registration goes first, which releases any thread still
    // blocked on a missing page, before the VM (whose teardown joins those threads).
    service: Option<PostcopyService>,
    vm: Box<dyn DestinationVm>,
}

impl PostcopyRemnant {
    /// Keeps `vm` (already paused) and the still-registered `service` (none when every page
    /// had arrived).
    pub(crate) fn new(
        service: Option<PostcopyService>,
        vm: Box<dyn DestinationVm>,
    ) -> PostcopyRemnant {
        PostcopyRemnant { service, vm }
    }

    /// The paused guest (its memory holds every page that arrived; reading a missing page
    /// blocks until [`PostcopyRemnant::release`]).
    pub fn vm(&self) -> &dyn DestinationVm {
        self.vm.as_ref()
    }

    /// Pages still missing.
    pub fn missing(&self) -> u64 {
        self.service.as_ref().map_or(0, PostcopyService::remaining)
    }

    /// Releases the userfaultfd registration and returns the VM. Missing pages read as zeroes
    /// from then on: resume the guest only after restoring them by other means.
    pub fn release(self) -> Box<dyn DestinationVm> {
        let PostcopyRemnant { service, vm } = self;
        drop(service);
        vm
    }
}

pub use crate::error::PausedGuest;

impl PausedGuest {
    /// A slot holding `r`.
    pub(crate) fn new(r: PostcopyRemnant) -> PausedGuest {
        PausedGuest(Arc::new(Mutex::new(Some(Box::new(r)))))
    }

    /// Takes the remnant (once); `None` afterwards.
    pub fn take(&self) -> Option<PostcopyRemnant> {
        let held = self.0.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        // `new` is the only way in, so the remnant is always a PostcopyRemnant.
        held.downcast::<PostcopyRemnant>().ok().map(|r| *r)
    }
}
