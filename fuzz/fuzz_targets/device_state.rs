//! Device-state blobs from an untrusted source: the synthetic VM's (header and varint page
//! generations, for a VM whose page count comes from the first 4 input bytes) and the KVM
//! guest's (vCPU registers and VMM state). Neither decoder may panic; a KVM state that decodes
//! re-encodes to bytes that decode to the same encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdmig_vmm::kvm::state::DeviceState;
use rdmig_vmm::synthetic::state;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let pages = u64::from(u32::from_le_bytes(data[..4].try_into().expect("4 bytes")));
        if let Ok((h, gens)) = state::decode(&data[4..], pages) {
            assert!(h.span <= h.pages && h.pages == pages);
            // Walking the generations must not panic and must yield exactly `span` of them.
            assert_eq!(gens.count() as u64, h.span);
        }
    }
    if let Ok(d) = DeviceState::decode(data) {
        let bytes = d.encode();
        let again = DeviceState::decode(&bytes).expect("its own encoding decodes");
        assert_eq!(again.encode(), bytes);
    }
});
