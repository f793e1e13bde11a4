//! The migration seam for [`KvmVm`]: dirty log, pause/resume and device state as
//! [`SourceVm`], restore and resume as [`DestinationVm`].

use std::any::Any;
use std::time::Duration;

use rdmig_transport::mem::{GuestMemoryMap, RegionId};
use rdmig_transport::pages::PageSet;
use rdmig_transport::vm::{check_throttle, DestinationVm, SourceVm};
use rdmig_transport::VmmError;

use super::control::GuestParams;
use super::dirty::fold_into;
use super::pacer::Pacer;
use super::state::{DeviceState, VcpuState, VmmState};
use super::vm::{kvm_err, KvmVm};
use crate::error::{Error, Result};

/// How long the destination's pause waits for the vCPU to park.
const DEST_PAUSE_WAIT: Duration = Duration::from_millis(500);

impl KvmVm {
    fn do_pause(&mut self) -> Result<()> {
        self.vcpu.pause()?;
        self.paused = true;
        Ok(())
    }

    /// Pauses the destination guest after post-copy lost its source. A vCPU blocked in
    /// `KVM_RUN` on a missing page is interrupted by the kick (KVM's wait for the page heeds
    /// signals on recent kernels) and parks without executing the access; on kernels where the
    /// wait ignores signals it stays blocked with the pause pending, and parks as soon as the
    /// page arrives or the userfaultfd registration is released, before running guest code.
    fn do_pause_destination(&mut self) -> Result<()> {
        let parked = self.vcpu.pause_within(DEST_PAUSE_WAIT)?;
        self.paused = true;
        if !parked {
            tracing::warn!(
                "the destination vCPU is blocked on a missing guest page; it stays blocked and \
                 parks once the page is resolved or released"
            );
        }
        Ok(())
    }

    fn do_resume(&mut self) -> Result<()> {
        if !self.paused {
            return Ok(());
        }
        if self.params.is_none() {
            // Only for a version-1 device state (without the parameters): this reads guest
            // memory, which in post-copy blocks until the page arrives.
            let p = self.read_params()?;
            self.vcpu.with_pacer(|pc| pc.set_ws_pages(p.ws_pages));
            self.params = Some(p);
        }
        self.vcpu.resume()?;
        self.paused = false;
        Ok(())
    }

    /// Fetches-and-clears KVM's log for every slot, plus the VMM's own writes, into `into`.
    fn fetch_dirty(&mut self, into: &mut PageSet) -> Result<()> {
        let shift = self.map.page_size().shift();
        for (i, r) in self.map.regions().iter().enumerate() {
            let words = self
                .vm
                .get_dirty_log(i as u32, r.len() as usize)
                .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
            let region = RegionId(i as u32);
            if shift == 12 {
                into.or_words(region, &words);
            } else {
                fold_into(into, region, &words, shift - 12);
            }
        }
        into.union_with(&self.vmm_dirty);
        self.vmm_dirty.clear();
        Ok(())
    }

    fn do_save(&mut self) -> Result<Vec<u8>> {
        if !self.paused {
            return Err(Error::Guest("save_state needs a paused guest".into()));
        }
        let v = self.vcpu.save()?;
        let params = self.params;
        let vmm = self.vcpu.with_pacer(|p| VmmState {
            dirty_rate: p.rate(),
            pages_dirtied: p.total(),
            params,
        });
        let blob = DeviceState {
            vmm,
            vcpus: vec![v],
        }
        .encode();
        self.last_state = Some(blob.clone());
        Ok(blob)
    }

    fn do_restore(&mut self, blob: &[u8]) -> Result<()> {
        let state = DeviceState::decode(blob)?;
        let [v] = &state.vcpus[..] else {
            return Err(Error::State(format!(
                "{} vCPUs in the device state, this VMM runs 1",
                state.vcpus.len()
            )));
        };
        // Checked against this VM's memory before anything changes. Known parameters spare
        // the resume a read of the parameter page, which in post-copy may still be missing.
        let params = match state.vmm.params {
            Some(p) => Some(
                GuestParams::decode(&p.encode(), self.map.total_bytes())
                    .map_err(|e| Error::State(format!("device state: {e}")))?,
            ),
            None => None,
        };
        let back: VcpuState = self.vcpu.restore(v)?;
        let rate = self.rate_override.unwrap_or(state.vmm.dirty_rate);
        self.vcpu.with_pacer(|p| {
            *p = Pacer::new(rate, params.map_or(0, |p| p.ws_pages));
            p.set_total(state.vmm.pages_dirtied);
        });
        if params.is_some() {
            self.params = params;
        }
        self.last_state = Some(
            DeviceState {
                vmm: state.vmm,
                vcpus: vec![back],
            }
            .encode(),
        );
        Ok(())
    }
}

impl SourceVm for KvmVm {
    fn memory(&self) -> &GuestMemoryMap {
        &self.map
    }

    fn descriptor(&self) -> rdmig_transport::vm::VmDescriptor {
        rdmig_transport::vm::VmDescriptor::new(super::KIND, super::state::VERSION.into())
    }

    fn start_dirty_log(&mut self) -> Result<(), VmmError> {
        // Logging is on from the slot's creation; start with a clean log.
        let mut scratch = PageSet::empty(&self.map);
        self.fetch_dirty(&mut scratch)?;
        Ok(())
    }

    fn fetch_and_clear_dirty(&mut self, into: &mut PageSet) -> Result<(), VmmError> {
        Ok(self.fetch_dirty(into)?)
    }

    fn pause(&mut self) -> Result<(), VmmError> {
        Ok(self.do_pause()?)
    }

    fn resume(&mut self) -> Result<(), VmmError> {
        Ok(self.do_resume()?)
    }

    fn save_state(&mut self) -> Result<Vec<u8>, VmmError> {
        Ok(self.do_save()?)
    }

    /// vCPU pacing: the vCPU thread sleeps `percent` % of each time slice (see `vcpu`).
    fn throttle(&mut self, percent: u8) -> Result<(), VmmError> {
        check_throttle(percent)?;
        self.vcpu.set_throttle(percent);
        Ok(())
    }
}

impl DestinationVm for KvmVm {
    fn memory(&self) -> &GuestMemoryMap {
        &self.map
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), VmmError> {
        Ok(self.do_restore(state)?)
    }

    fn resume(&mut self) -> Result<(), VmmError> {
        Ok(self.do_resume()?)
    }

    fn pause(&mut self) -> Result<(), VmmError> {
        Ok(self.do_pause_destination()?)
    }

    fn memory_starts_zero(&self) -> bool {
        // A destination's memory is fresh and unwritten until the migration lands pages.
        true
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}
