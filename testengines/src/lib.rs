//! Test support: real PostgreSQL and Redis servers, started on free loopback ports in temporary
//! directories and stopped when their handle is dropped. Used by the bridge's store tests and by
//! the cluster tests; never by a release binary.

pub mod port;
pub mod postgres;
pub mod redis;
