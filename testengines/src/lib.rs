//! Test support: real PostgreSQL and Redis servers, started on free loopback ports in temporary
//! directories and stopped when their handle is dropped; free ports ([`port`]); and `/proc`
//! readings for the benchmarks ([`procfs`]). Used by the bridge's store tests, the cluster
//! tests and the benchmarks; never by a release binary.

pub mod port;
pub mod postgres;
pub mod procfs;
pub mod redis;
