//! RDMA `DataSetup` / `DataSetupAck` payloads (GID, MTU, queue pairs, region keys) from an
//! untrusted peer. The first byte picks the kind; the rest is the payload. What decodes must
//! encode and decode back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdmig_transport::rdma::setup::{Setup, KIND_ACK, KIND_SETUP};

fuzz_target!(|data: &[u8]| {
    let Some((&k, payload)) = data.split_first() else {
        return;
    };
    let kind = if k & 1 == 0 { KIND_SETUP } else { KIND_ACK };
    if let Ok(s) = Setup::decode(kind, payload) {
        let again = Setup::decode(kind, &s.encode(kind)).expect("its own encoding decodes");
        assert_eq!(again, s);
    }
});
