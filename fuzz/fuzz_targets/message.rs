//! Control messages from an untrusted peer: a 16-byte header, then its payload.
//!
//! Input: header bytes then payload bytes, as they arrive on the control channel. Checks that
//! neither `Message::check_header` nor `Message::decode` panics, and that whatever decodes
//! encodes again to a message that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdmig_transport::wire::{Command, Header, Message};

const HEADER: usize = size_of::<Header>();

fuzz_target!(|data: &[u8]| {
    let decoded = if data.len() >= HEADER {
        let hdr: &[u8; HEADER] = data[..HEADER].try_into().expect("header size");
        match Message::check_header(hdr) {
            Ok((cmd, len)) => {
                let payload = &data[HEADER..];
                Message::decode(cmd, &payload[..len.min(payload.len())]).ok()
            }
            // A header the real receiver refuses; still drive the payload decoder with the
            // command in its first two bytes, to reach every payload check.
            Err(_) => Command::from_u16(u16::from_le_bytes([data[0], data[1]]))
                .ok()
                .filter(|c| data.len() - 2 <= c.max_payload())
                .and_then(|c| Message::decode(c, &data[2..]).ok()),
        }
    } else {
        None
    };
    if let Some(m) = decoded {
        let bytes = m.encode().expect("a decoded message encodes");
        let hdr: &[u8; HEADER] = bytes[..HEADER].try_into().expect("header size");
        let (cmd, len) = Message::check_header(hdr).expect("its own header checks");
        assert_eq!(len, bytes.len() - HEADER);
        let again = Message::decode(cmd, &bytes[HEADER..]).expect("its own encoding decodes");
        assert_eq!(again, m);
    }
});
