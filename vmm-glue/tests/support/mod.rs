//! Test support shared by the vmm-glue integration tests.

// Each test crate uses its own subset of the support code.
#![allow(dead_code)]

pub mod interrupted;
pub mod relay;
pub mod rxe;
pub mod synthetic;
pub mod uffd;
