//! Headers on TCP data and post-copy streams from an untrusted peer: the greeting
//! (`StreamHello`), data headers (`DataHeader`) and page requests (`PageRequest`). The first
//! byte picks the decoder; the rest is the header. What decodes must re-encode to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdmig_transport::wire::{DataFrame, DataHeader, PageRequest, StreamHello, MAC_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            let Some(b) = rest.get(..size_of::<StreamHello>()) else {
                return;
            };
            let b: &[u8; size_of::<StreamHello>()] = b.try_into().expect("size");
            // Count and token from the greeting's own bytes too, so a valid one is reachable.
            let count = u16::from_le_bytes([b[6], b[7]]);
            let token: [u8; MAC_LEN] = b[8..8 + MAC_LEN].try_into().expect("token");
            if let Ok(i) = StreamHello::check(b, count, &token) {
                assert!(i < count);
            }
            let _ = StreamHello::check(b, 4, &[0u8; MAC_LEN]);
        }
        1 => {
            let Some(b) = rest.get(..size_of::<DataHeader>()) else {
                return;
            };
            let b: &[u8; size_of::<DataHeader>()] = b.try_into().expect("size");
            if let Ok(f) = DataHeader::decode(b) {
                let h = match f {
                    DataFrame::Pages { round, range } => {
                        DataHeader::pages(round, range.region.0, range.first.0, range.npages as u32)
                    }
                    DataFrame::EndOfRound { round, pages } => {
                        DataHeader::end_of_round(round, pages)
                    }
                    DataFrame::Postcopy { range } => DataHeader::postcopy(&range),
                };
                assert_eq!(bytemuck_bytes(&h), &b[..]);
            }
        }
        _ => {
            let Some(b) = rest.get(..size_of::<PageRequest>()) else {
                return;
            };
            let b: &[u8; size_of::<PageRequest>()] = b.try_into().expect("size");
            if let Ok(r) = PageRequest::decode(b) {
                let again = match r {
                    Some(range) => {
                        assert!(range.npages >= 1);
                        PageRequest::decode(&raw(&PageRequest::pages(&range)))
                    }
                    None => PageRequest::decode(&raw(&PageRequest::end())),
                };
                assert_eq!(again.expect("its own encoding decodes"), r);
            }
        }
    }
});

fn bytemuck_bytes(h: &DataHeader) -> Vec<u8> {
    bytemuck::bytes_of(h).to_vec()
}

fn raw<T: bytemuck::Pod, const N: usize>(t: &T) -> [u8; N] {
    bytemuck::bytes_of(t).try_into().expect("header size")
}
