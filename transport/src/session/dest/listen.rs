//! The destination's listener: unauthenticated connections never end it and never delay a
//! real migration.
//!
//! Each incoming control connection runs its handshake (Hello, HelloAck, AuthProof) on a
//! thread of its own, every message bounded by [`HANDSHAKE_TIMEOUT`] (a silent or dripping peer
//! is dropped when it passes), at most [`MAX_PENDING`] at once: a new connection beyond that
//! evicts the oldest pending one (a flood of silent connections cannot lock a real source out:
//! a real handshake takes milliseconds, so only [`MAX_PENDING`] newer connections arriving within
//! those milliseconds could evict it). The
//! first connection that proves the key wins and the migration goes on over it; the others
//! are dropped as their handshakes end. A refused connection is logged and the listener keeps
//! serving — until the configured listen timeout, after which `accept` returns the last
//! refusal (or a timeout when there was none).

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::config::{MigrationConfig, MigrationMode};
use crate::auth::random_bytes;
use crate::channel::{ChannelListener, Stream};
use crate::control::{pre_auth_reason, Control};
use crate::data::local_rdma;
use crate::error::{Error, Result};
use crate::pending::{self, Pending};
use crate::postcopy::Uffd;
use crate::rdma::RdmaOptions;
use crate::session::MigrationControl;
use crate::wire::{
    caps, Command, Hello, HelloAck, Message, TransportKind, MAC_LEN, NONCE_LEN, PROTOCOL_VERSION,
};

/// Longest any one handshake message may take (shorter when the I/O timeout is).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most handshakes in progress at once.
pub const MAX_PENDING: usize = 64;

/// What a reconnection must prove to continue a migration paused in post-copy.
#[derive(Clone)]
pub(super) struct Rejoin {
    /// The migration id both ends derived in the first handshake.
    pub id: [u8; MAC_LEN],
    /// The transport the migration runs on (the reconnection must choose it again).
    pub transport: TransportKind,
}

/// What an authenticated handshake settled.
pub(super) struct Handshake {
    pub hello: Hello,
    pub transport: TransportKind,
    /// Why that transport, in full (logged here; the source got only the fixed case).
    pub detail: String,
    pub rdma_opts: RdmaOptions,
    pub mode: MigrationMode,
    pub nonce_d: [u8; NONCE_LEN],
    /// Both ends send zero pages as ranges.
    pub zero_pages: bool,
    /// The source tracks dirty pages by content: `Landed` goes before every `RoundDone`.
    pub landed: bool,
}

/// Serves `listener` until a source proves the key; returns its control connection (AuthOk
/// not yet sent) and what the handshake settled. With `rejoin`, only a reconnection that
/// proves it continues that migration is taken (until `until`, else the listen timeout).
pub(super) fn authenticate(
    listener: &dyn ChannelListener,
    config: &MigrationConfig,
    control: &MigrationControl,
    rejoin: Option<(&Rejoin, Instant)>,
) -> Result<(Control, Handshake)> {
    let until = match rejoin {
        Some((_, t)) => Some(t),
        None => config.listen_timeout.map(|t| Instant::now() + t),
    };
    let waited = until.map(|t| t.saturating_duration_since(Instant::now()));
    let rejoin = Arc::new(rejoin.map(|(r, _)| r.clone()));
    let config = Arc::new(config.clone());
    let (tx, rx) = mpsc::channel::<Result<(Control, Handshake)>>();
    let mut pending = Pending::new(MAX_PENDING);
    let mut last_refusal: Option<Error> = None;
    loop {
        control.check()?;
        // (Its control connection is watched for a cancel once it wins.)
        while let Ok(r) = rx.try_recv() {
            match r {
                Ok(won) => return Ok(won),
                Err(e) => last_refusal = Some(e),
            }
        }
        match listener.poll_accept() {
            Ok((stream, peer)) => {
                let Some(done) = pending.admit(&stream, "handshakes") else {
                    tracing::warn!("refused a connection from {peer}: cannot track its socket");
                    continue;
                };
                let (tx, config, rejoin) = (tx.clone(), config.clone(), rejoin.clone());
                let spawned = crate::threads::spawn("rdmig-handshake", move || {
                    let r = serve_handshake(stream, &config, rejoin.as_ref().as_ref());
                    if let Err(e) = &r {
                        tracing::warn!("refused a migration from {peer}: {e}");
                    }
                    pending::done(&done);
                    let _ = tx.send(r);
                });
                if let Err(e) = spawned {
                    return Err(Error::io("spawning a handshake", e, "control"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if until.is_some_and(|t| Instant::now() >= t) {
                    let t = waited.unwrap_or_default();
                    let what = if rejoin.is_some() {
                        "the source did not reconnect"
                    } else {
                        "no migration arrived"
                    };
                    return Err(match last_refusal {
                        Some(e) if rejoin.is_some() => Error::Timeout(format!(
                            "{what} within {t:?} (last refused reconnection: {e})"
                        )),
                        Some(e) => e,
                        None => Error::Timeout(format!("{what} within {t:?}")),
                    });
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(Error::io("accepting the control connection", e, "control")),
        }
    }
}

/// One connection's handshake; on failure the peer is told only the kind of failure.
fn serve_handshake(
    stream: Stream,
    config: &MigrationConfig,
    rejoin: Option<&Rejoin>,
) -> Result<(Control, Handshake)> {
    stream
        .set_nonblocking(false)
        .map_err(|e| Error::io("control blocking mode", e, "control"))?;
    let mut ctl = Control::new(stream, Some(config.io_timeout.min(HANDSHAKE_TIMEOUT)))?;
    match handshake(&mut ctl, config, rejoin) {
        Ok(h) => {
            ctl.set_timeout(Some(config.io_timeout));
            Ok((ctl, h))
        }
        Err(e) => {
            if !matches!(e, Error::PeerAborted(_)) {
                ctl.send_abort(pre_auth_reason(&e));
            }
            ctl.shutdown();
            Err(e)
        }
    }
}

/// Hello, HelloAck, AuthProof (and for a reconnection `Recover`): checks the source's request
/// and its proof of the key (and of the migration it continues).
fn handshake(
    ctl: &mut Control,
    config: &MigrationConfig,
    rejoin: Option<&Rejoin>,
) -> Result<Handshake> {
    let Message::Hello(hello) = ctl.recv_filtered("awaiting Hello", &|c| c == Command::Hello)?
    else {
        unreachable!("filtered")
    };
    if hello.version != PROTOCOL_VERSION {
        return Err(Error::VersionMismatch {
            peer: hello.version,
            ours: PROTOCOL_VERSION,
        });
    }
    if hello.streams == 0 || hello.streams > 64 {
        return Err(Error::Protocol(format!(
            "Hello asks for {} data streams (1..=64)",
            hello.streams
        )));
    }
    let reconnect = hello.caps & caps::RECONNECT != 0;
    match (reconnect, rejoin) {
        (true, None) => {
            return Err(Error::Protocol(
                "a reconnection, but no migration is paused here".into(),
            ))
        }
        (false, Some(_)) => {
            return Err(Error::Protocol(
                "a new migration, while one is paused in post-copy here".into(),
            ))
        }
        _ => {}
    }
    let (transport, public, detail, rdma_opts) = choose_transport(config, &hello)?;
    if let Some(r) = rejoin {
        if transport != r.transport {
            return Err(Error::Protocol(format!(
                "the reconnection chose {}, the migration runs on {}",
                transport.name(),
                r.transport.name()
            )));
        }
    }
    let mode = MigrationMode::from_u8(hello.mode)?;
    if mode != MigrationMode::Precopy {
        if hello.caps & caps::POSTCOPY == 0 {
            return Err(Error::Protocol(format!(
                "Hello asks for {} without the post-copy capability",
                mode.name()
            )));
        }
        Uffd::probe().map_err(|e| {
            Error::PostcopyUnavailable(format!(
                "the destination cannot run a {} migration: {e}",
                mode.name()
            ))
        })?;
    }
    let nonce_d = random_bytes()?;
    let psk = &config.psk;
    psk.check_connection(ctl.stream().tls())?;
    let mut my_caps = caps::TCP;
    if transport == TransportKind::Rdma {
        my_caps |= caps::RDMA;
    }
    if mode != MigrationMode::Precopy {
        my_caps |= caps::POSTCOPY;
    }
    my_caps |= caps::LIVE_PARAMS | caps::VM_INFO;
    if hello.caps & caps::RECOVER != 0 && config.recover_timeout.is_some() {
        my_caps |= caps::RECOVER;
    }
    if hello.caps & caps::ABORT_CODES != 0 {
        my_caps |= caps::ABORT_CODES;
        ctl.set_abort_codes(true);
    }
    let zero_pages = config.zero_pages && hello.caps & caps::ZERO_PAGES != 0;
    if zero_pages {
        my_caps |= caps::ZERO_PAGES;
    }
    // Dirty tracking by content compares pre-copy rounds only.
    let landed = mode == MigrationMode::Precopy && hello.caps & caps::LANDED != 0;
    if landed {
        my_caps |= caps::LANDED;
    }
    ctl.send(&Message::HelloAck(HelloAck {
        version: PROTOCOL_VERSION,
        transport,
        caps: my_caps,
        nonce: nonce_d,
        mac: psk.dest_proof(&hello.nonce, &nonce_d),
        reason: public.to_string(),
    }))?;
    let Message::AuthProof(mac) =
        ctl.recv_filtered("awaiting AuthProof", &|c| c == Command::AuthProof)?
    else {
        unreachable!("filtered")
    };
    if !psk.check_source_proof(&hello.nonce, &nonce_d, &mac) {
        return Err(Error::AuthFailed(
            "the source did not prove the pre-shared key (not the same key?)".into(),
        ));
    }
    if let Some(r) = rejoin {
        let Message::Recover(proof) =
            ctl.recv_filtered("awaiting Recover", &|c| c == Command::Recover)?
        else {
            unreachable!("filtered")
        };
        if !psk.check_recover_proof(&r.id, &hello.nonce, &nonce_d, &proof) {
            return Err(Error::AuthFailed(
                "the reconnection does not continue the migration paused here (another \
                 migration's id)"
                    .into(),
            ));
        }
    }
    Ok(Handshake {
        hello,
        transport,
        detail,
        rdma_opts,
        mode,
        nonce_d,
        zero_pages,
        landed,
    })
}

/// The transport for `hello`: the choice, what the source is told of why (fixed text, no
/// device names or driver errors: it has not proved the key yet), the full reason for this
/// end's log, and the RDMA options.
fn choose_transport(
    config: &MigrationConfig,
    hello: &Hello,
) -> Result<(TransportKind, &'static str, String, RdmaOptions)> {
    let opts = config.rdma.clone();
    let local = match config.transport {
        TransportKind::Tcp => Err("the destination is configured for TCP only".to_string()),
        _ => local_rdma(&opts),
    };
    let source_rdma = hello.caps & caps::RDMA != 0;
    Ok(match hello.transport {
        TransportKind::Tcp => (
            TransportKind::Tcp,
            "the source requested TCP",
            "the source requested TCP".into(),
            opts,
        ),
        TransportKind::Rdma => match local {
            Ok(dev) => (
                TransportKind::Rdma,
                "RDMA requested",
                format!("RDMA requested; destination device {}", dev.name),
                opts,
            ),
            Err(why) => {
                return Err(Error::RdmaUnavailable(format!(
                    "the source requested RDMA but the destination cannot: {why}"
                )))
            }
        },
        TransportKind::Auto => match (source_rdma, local) {
            (true, Ok(dev)) => (
                TransportKind::Rdma,
                "both ends have a usable RDMA device",
                format!(
                    "both ends have a usable RDMA device (destination: {} port {})",
                    dev.name, dev.port
                ),
                opts,
            ),
            (false, _) => (
                TransportKind::Tcp,
                "the source has no usable RDMA device",
                "the source has no usable RDMA device".into(),
                opts,
            ),
            (true, Err(why)) => (
                TransportKind::Tcp,
                "the destination has no usable RDMA device",
                format!("the destination has no usable RDMA device: {why}"),
                opts,
            ),
        },
    })
}
