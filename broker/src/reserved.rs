//! The broker's reserved prefix: the client ids of its own connections start with it
//! (`router`), and so do the keys of the user properties it carries through the router
//! (`carry`). A client's client id with it is refused, a client's user property with it
//! removed.

/// The prefix.
pub(crate) const INTERNAL_PREFIX: &str = "fleetbeat-internal-";
