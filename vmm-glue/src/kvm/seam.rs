//! The migration seam for [`KvmVm`]: dirty log, pause/resume and device state as
//! [`SourceVm`], restore and resume as [`DestinationVm`].

use std::any::Any;

use rdmig_transport::mem::{GuestMemoryMap, RegionId};
use rdmig_transport::pages::PageSet;
use rdmig_transport::vm::{DestinationVm, SourceVm};
use rdmig_transport::VmmError;

use super::dirty::fold_into;
use super::pacer::Pacer;
use super::state::{DeviceState, VcpuState, VmmState};
use super::vm::{kvm_err, KvmVm};
use crate::error::{Error, Result};

impl KvmVm {
    fn do_pause(&mut self) -> Result<()> {
        self.vcpu.pause()?;
        self.paused = true;
        Ok(())
    }

    fn do_resume(&mut self) -> Result<()> {
        if !self.paused {
            return Ok(());
        }
        if self.params.is_none() {
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
        let vmm = self.vcpu.with_pacer(|p| VmmState {
            dirty_rate: p.rate(),
            pages_dirtied: p.total(),
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
        let back: VcpuState = self.vcpu.restore(v)?;
        let rate = self.rate_override.unwrap_or(state.vmm.dirty_rate);
        self.vcpu.with_pacer(|p| {
            *p = Pacer::new(rate, 0);
            p.set_total(state.vmm.pages_dirtied);
        });
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

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}
