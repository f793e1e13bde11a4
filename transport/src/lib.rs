//! rdmig's transport: moves a running VM's memory to another host.
//!
//! A VMM implements the [`vm::SourceVm`] seam on the source and hands a
//! [`vm::DestinationFactory`] to the destination; [`session::migrate`] and
//! [`session::accept`] run the two ends of the [`wire`] protocol over a control connection,
//! moving pages with one-sided RDMA reads ([`rdma`]) or TCP streams ([`tcp`]).

pub mod abort;
pub mod auth;
pub mod channel;
pub mod control;
pub mod cpu;
pub mod data;
pub mod digest;
mod error;
pub mod mem;
pub mod pace;
pub mod pages;
mod pending;
pub mod postcopy;
pub mod rdma;
pub mod require;
pub mod session;
pub mod tcp;
mod threads;
pub mod vm;
pub mod wire;
pub mod zero;

pub use error::{Error, Result, VmmError};
pub use threads::{set_thread_hook, ThreadHook};
