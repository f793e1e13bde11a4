//! The one error type of the VMM glue crate.

/// Result alias for the glue.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the VM adapters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is unusable.
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),

    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(#[source] rdmig_transport::Error),

    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },

    /// KVM is not usable on this host.
    #[error("KVM unavailable: {0}")]
    KvmUnavailable(String),

    /// The guest did something unexpected (bad exit, bad port I/O, self-check failure).
    #[error("guest: {0}")]
    Guest(String),

    /// Device state could not be parsed.
    #[error("device state: {0}")]
    State(String),

    /// A VM thread failed or panicked.
    #[error("VM thread: {0}")]
    Thread(String),

    /// QEMU answered a QMP command with an error.
    #[error("QEMU {command}: {desc}")]
    Qmp {
        /// The QMP command.
        command: String,
        /// QEMU's error class and description.
        desc: String,
    },

    /// Talking to QEMU (its QMP socket, its migration stream) failed.
    #[error("QEMU {context}: {source}")]
    QemuIo {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// QEMU is set up in a way rdmig cannot migrate (the message says what to change).
    #[error("QEMU setup: {0}")]
    QemuSetup(String),

    /// The QEMU process went away (its QMP socket closed).
    #[error("QEMU exited: {0}")]
    QemuExited(String),

    /// QEMU did not answer or finish in time.
    #[error("QEMU timed out: {0}")]
    QemuTimeout(String),
}
