//! Writes the seed corpus: one real encoding of every message, setup payload, device state and
//! stream header, into `corpus/<target>/seed-*` (run from the `fuzz` folder:
//! `cargo run --release --example make_seeds`). The seeds are committed; libFuzzer grows from them.

use std::path::Path;

use rdmig_transport::mem::{GuestAddress, PageIndex, RegionId};
use rdmig_transport::pages::PageRange;
use rdmig_transport::rdma::setup::{QpInfo, RemoteRegion, Setup, KIND_ACK, KIND_SETUP};
use rdmig_transport::rdma::{Gid, Psn, Qpn, RKey};
use rdmig_transport::wire::{
    Complete, DataHeader, Hello, HelloAck, Message, PageRequest, PostcopyComplete, Round,
    RoundDone, StreamHello, TransportKind, MAC_LEN, NONCE_LEN,
};
use rdmig_vmm::kvm::state::{DeviceState, VcpuState};
use rdmig_vmm::synthetic::state::{self, StateHeader};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus folder");
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed file");
}

fn range(region: u32, first: u64, npages: u64) -> PageRange {
    PageRange {
        region: RegionId(region),
        first: PageIndex(first),
        npages,
    }
}

fn main() {
    let complete = Complete {
        digest: 0x1234_5678_9abc_def0_1122_3344_5566_7788,
        cpu_micros: 5,
        resume_micros: 6,
        pages: 7,
        bytes: 8 << 12,
    };
    let messages = [
        Message::Hello(Hello {
            version: rdmig_transport::wire::PROTOCOL_VERSION,
            transport: TransportKind::Auto,
            mode: 0,
            caps: 3,
            streams: 4,
            qps: 2,
            max_bandwidth: 0,
            nonce: [9; NONCE_LEN],
        }),
        Message::HelloAck(HelloAck {
            version: rdmig_transport::wire::PROTOCOL_VERSION,
            transport: TransportKind::Tcp,
            caps: 1,
            nonce: [8; NONCE_LEN],
            mac: [7; MAC_LEN],
            reason: "no RDMA device".into(),
        }),
        Message::AuthProof([6; MAC_LEN]),
        Message::Recover([5; MAC_LEN]),
        Message::AuthOk,
        Message::RegionTable {
            page_size: 4096,
            regions: vec![(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 2 << 20)],
        },
        Message::DataSetup(vec![1, 2, 3]),
        Message::DataSetupAck(vec![4, 5]),
        Message::Ready,
        Message::Round(Round {
            round: 2,
            chunk: 0,
            flags: 1,
            ranges: vec![range(0, 1, 2), range(1, 0, 16)],
        }),
        Message::RoundDone(RoundDone {
            round: 2,
            pages: 18,
            bytes: 18 << 12,
            micros: 100,
        }),
        Message::DeviceState(vec![0xaa; 64]),
        Message::Switchover {
            digest: 42,
            pages: 768,
        },
        Message::Complete(complete),
        Message::Finish,
        Message::Abort("cancelled".into()),
        Message::Fail {
            code: 1,
            reason: "the migration was cancelled".into(),
        },
        Message::Params {
            max_bandwidth: 1 << 30,
        },
        Message::PostcopyMissing {
            chunk: 0,
            flags: 1,
            ranges: vec![range(0, 5, 1)],
        },
        Message::PostcopyResumed {
            resume_micros: 300,
            missing: 12,
        },
        Message::PostcopyComplete(PostcopyComplete {
            complete,
            faults: 3,
            fault_pages: 3,
            postcopy_micros: 1000,
            latency_ns: [1, 2, 3, 4, 5],
        }),
        Message::PostcopyDropped {
            micros: 10,
            pages: 4,
        },
    ];
    for (i, m) in messages.iter().enumerate() {
        write(
            "message",
            &format!("{i:02}-{}", m.name()),
            &m.encode().expect("encode"),
        );
    }

    let setup = Setup {
        gid: Gid([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 99, 0, 1]),
        mtu: 3,
        rd_atomic: 16,
        qps: vec![
            QpInfo {
                qpn: Qpn(17),
                psn: Psn(0x1234),
            },
            QpInfo {
                qpn: Qpn(18),
                psn: Psn(0x99),
            },
        ],
        regions: vec![RemoteRegion {
            addr: 0x7f00_0000_0000,
            len: 1 << 20,
            rkey: RKey(0x55),
        }],
    };
    let mut b = vec![0u8];
    b.extend(setup.encode(KIND_SETUP));
    write("rdma_setup", "setup", &b);
    let ack = Setup {
        regions: vec![],
        ..setup
    };
    let mut b = vec![1u8];
    b.extend(ack.encode(KIND_ACK));
    write("rdma_setup", "ack", &b);

    let h = StateHeader {
        page_size: 4096,
        pages_written: 100,
        pages: 64,
        span: 16,
        populated: 48,
        zero_share: 10,
    };
    let mut b = 64u32.to_le_bytes().to_vec();
    b.extend(state::encode(&h, (0..16u64).map(|g| g * 300)));
    write("device_state", "synthetic", &b);
    let kvm = DeviceState {
        vcpus: vec![VcpuState::default()],
        ..DeviceState::default()
    };
    write("device_state", "kvm", &kvm.encode());

    let mut b = vec![0u8];
    b.extend(bytemuck::bytes_of(&StreamHello::new(1, 4, [3; MAC_LEN])));
    write("stream_headers", "hello", &b);
    let mut b = vec![1u8];
    b.extend(bytemuck::bytes_of(&DataHeader::pages(1, 0, 10, 4)));
    write("stream_headers", "pages", &b);
    let mut b = vec![1u8];
    b.extend(bytemuck::bytes_of(&DataHeader::end_of_round(1, 4)));
    write("stream_headers", "end-of-round", &b);
    let mut b = vec![2u8];
    b.extend(bytemuck::bytes_of(&PageRequest::pages(&range(0, 3, 2))));
    write("stream_headers", "request", &b);
    let mut b = vec![2u8];
    b.extend(bytemuck::bytes_of(&PageRequest::end()));
    write("stream_headers", "request-end", &b);
}
