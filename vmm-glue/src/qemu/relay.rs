//! QEMU's device state, relayed through rdmig: on the source QEMU `migrate`s (with
//! `x-ignore-shared`, so its stream holds devices, CPUs and the non-shared ROM blocks, never
//! the RAM rdmig moved) into a Unix socket rdmig listens on; rdmig collects the bytes and the
//! transport carries them over its authenticated control channel. On the destination QEMU
//! `migrate-incoming`s from a Unix socket it listens on and rdmig writes the bytes into it.
//!
//! The sockets live in a private directory next to rdmig's other run-time files (never on a 9p
//! mount: Unix sockets cannot be created there).
//!
//! The blob the transport carries is QEMU's stream behind a small header of rdmig's
//! ([`wrap`], [`unwrap`]): a magic and whether the guest was running when rdmig paused it. The
//! destination starts the guest only then; a guest its operator had paused stays paused there,
//! as QEMU's own migration leaves it (QEMU cannot tell: the run state in its stream is the
//! `paused` rdmig's own `stop` made).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::qmp::Qmp;
use crate::error::{Error, Result};

/// Capabilities rdmig sets on both QEMUs.
pub fn set_capabilities(qmp: &mut Qmp) -> Result<()> {
    let caps = qmp.execute("query-migrate-capabilities", None)?;
    let has = |name: &str| {
        caps.as_array()
            .is_some_and(|a| a.iter().any(|c| c["capability"] == name))
    };
    if !has("x-ignore-shared") {
        return Err(Error::QemuSetup(format!(
            "QEMU {} has no x-ignore-shared migration capability (QEMU 4.0 or later is needed)",
            qmp.version()
        )));
    }
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [
            { "capability": "x-ignore-shared", "state": true },
            { "capability": "events", "state": true },
        ]})),
    )?;
    Ok(())
}

/// The header's magic: "RDMIGQ", then the header's version.
pub const STATE_MAGIC: [u8; 8] = *b"RDMIGQ\0\x01";

/// Bytes of rdmig's header before QEMU's stream: the magic and one flags byte.
pub const STATE_HEADER_LEN: usize = STATE_MAGIC.len() + 1;

/// Flag: the guest was running when rdmig paused it.
const WAS_RUNNING: u8 = 1;

/// The blob for the transport: rdmig's header, then QEMU's stream.
pub fn wrap(qemu_stream: &[u8], was_running: bool) -> Vec<u8> {
    let mut blob = Vec::with_capacity(STATE_HEADER_LEN + qemu_stream.len());
    blob.extend_from_slice(&STATE_MAGIC);
    blob.push(if was_running { WAS_RUNNING } else { 0 });
    blob.extend_from_slice(qemu_stream);
    blob
}

/// Splits a blob made by [`wrap`] into (was running, QEMU's stream).
pub fn unwrap(blob: &[u8]) -> Result<(bool, &[u8])> {
    let Some((head, stream)) = blob.split_at_checked(STATE_HEADER_LEN) else {
        return Err(Error::State(format!(
            "a QEMU device state of {} bytes, shorter than rdmig's header",
            blob.len()
        )));
    };
    if head[..STATE_MAGIC.len()] != STATE_MAGIC {
        return Err(Error::State(
            "the device state does not start with rdmig's QEMU header (a source of another \
             rdmig version, or not a QEMU source)"
                .into(),
        ));
    }
    let flags = head[STATE_MAGIC.len()];
    if flags & !WAS_RUNNING != 0 {
        return Err(Error::State(format!(
            "unknown flags {flags:#x} in the QEMU state header"
        )));
    }
    Ok((flags & WAS_RUNNING != 0, stream))
}

fn socket_path(dir: &Path, what: &str, pid: i32) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    dir.join(format!(
        "rdmig-{what}-{}-{pid}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Waits for the MIGRATION event that ends a migration; `Ok` for `completed`.
fn wait_done(qmp: &mut Qmp, timeout: Duration) -> Result<()> {
    let ev = qmp.wait_event("MIGRATION", timeout, |d| {
        matches!(
            d["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        )
    })?;
    if ev["data"]["status"] == "completed" {
        return Ok(());
    }
    let info: Value = qmp.execute("query-migrate", None).unwrap_or_default();
    Err(Error::Qmp {
        command: "migrate".into(),
        desc: format!(
            "QEMU's device-state migration {}: {}",
            ev["data"]["status"].as_str().unwrap_or("failed"),
            info["error-desc"].as_str().unwrap_or("no reason given")
        ),
    })
}

/// Has the paused source QEMU write its device state into a socket of ours; returns the bytes.
pub fn save(qmp: &mut Qmp, dir: &Path, timeout: Duration) -> Result<Vec<u8>> {
    let path = socket_path(dir, "state-out", qmp.pid().0);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| Error::QemuIo {
        context: format!("binding the device-state socket {}", path.display()),
        source: e,
    })?;
    let deadline = Instant::now() + timeout;
    let reader = std::thread::Builder::new()
        .name("qemu-state-in".into())
        .spawn(move || collect(listener, deadline))
        .map_err(|e| Error::QemuIo {
            context: "spawning the device-state reader".into(),
            source: e,
        })?;
    let started = qmp.execute(
        "migrate",
        Some(json!({ "uri": format!("unix:{}", path.display()) })),
    );
    let done = started.and_then(|_| wait_done(qmp, timeout));
    if done.is_err() {
        // Unblock the reader if QEMU never connected.
        let _ = UnixStream::connect(&path);
    }
    let bytes = reader
        .join()
        .map_err(|_| Error::Thread("the device-state reader panicked".into()))?;
    let _ = std::fs::remove_file(&path);
    done?;
    bytes
}

fn collect(listener: UnixListener, deadline: Instant) -> Result<Vec<u8>> {
    let (mut s, _) = listener.accept().map_err(|e| Error::QemuIo {
        context: "accepting QEMU's device-state connection".into(),
        source: e,
    })?;
    let left = deadline.saturating_duration_since(Instant::now());
    s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .map_err(|e| Error::QemuIo {
            context: "setting a read timeout".into(),
            source: e,
        })?;
    let mut out = Vec::with_capacity(256 << 10);
    s.read_to_end(&mut out).map_err(|e| Error::QemuIo {
        context: "reading QEMU's device state".into(),
        source: e,
    })?;
    Ok(out)
}

/// Feeds `state` to the destination QEMU (started with `-incoming defer`) and waits until it
/// has loaded it.
pub fn restore(qmp: &mut Qmp, dir: &Path, state: &[u8], timeout: Duration) -> Result<()> {
    let path = socket_path(dir, "state-in", qmp.pid().0);
    let _ = std::fs::remove_file(&path);
    qmp.execute(
        "migrate-incoming",
        Some(json!({ "uri": format!("unix:{}", path.display()) })),
    )?;
    let deadline = Instant::now() + timeout;
    let mut s = loop {
        match UnixStream::connect(&path) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("waiting for QEMU's incoming socket: {e}");
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => {
                return Err(Error::QemuIo {
                    context: format!("connecting to QEMU's incoming socket {}", path.display()),
                    source: e,
                })
            }
        }
    };
    let _ = std::fs::remove_file(&path);
    s.set_write_timeout(Some(timeout))
        .and_then(|()| s.write_all(state))
        .and_then(|()| s.shutdown(std::net::Shutdown::Write))
        .map_err(|e| Error::QemuIo {
            context: "writing the device state into QEMU".into(),
            source: e,
        })?;
    wait_done(qmp, deadline.saturating_duration_since(Instant::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_header_carries_the_run_state_and_is_checked() {
        let blob = wrap(b"QEVM stream", true);
        assert_eq!(blob.len(), STATE_HEADER_LEN + 11);
        assert_eq!(unwrap(&blob).unwrap(), (true, &b"QEVM stream"[..]));
        assert_eq!(unwrap(&wrap(b"", false)).unwrap(), (false, &b""[..]));
        assert!(unwrap(b"QEVM").is_err());
        assert!(unwrap(b"QEVM stream without header").is_err());
        let mut bad = wrap(b"x", false);
        bad[STATE_MAGIC.len()] = 0x80;
        assert!(unwrap(&bad).unwrap_err().to_string().contains("flags"));
    }
}
