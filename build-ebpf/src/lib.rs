#![no_std]
// This file exists so that build-user can name this crate as a build dependency and be
// rebuilt when it changes; the programs are the `buildcage` binary in main.rs.
