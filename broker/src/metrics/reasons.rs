//! The reasons the broker counts by: each enum is the `reason` label of one metric.

/// Declares a reason enum whose variants are the values of a metric's `reason` label, with
/// `ALL` (every reason, in label order), `label()` and the index of its counter.
macro_rules! reasons {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$variant_meta:meta])* $variant:ident => $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$variant_meta])* $variant, )+
        }

        impl $name {
            /// Every reason, in label order.
            pub const ALL: [$name; [$(stringify!($variant)),+].len()] = [$($name::$variant),+];

            /// The `reason` label value.
            pub const fn label(self) -> &'static str {
                match self {
                    $( $name::$variant => $label, )+
                }
            }

            /// The reason's position in `ALL`: its counter.
            pub(crate) const fn index(self) -> usize {
                self as usize
            }
        }
    };
}

reasons! {
    /// Why a CONNECT was refused by authentication (the `reason` label of
    /// `fleetbeat_broker_auth_refused_total`).
    pub enum AuthRefusal {
        /// The CONNECT carried no username (or no password) while credentials are required.
        NoCredentials => "no_credentials",
        /// The username names no device and no client in the credentials file.
        UnknownUser => "unknown_user",
        /// The password does not match the stored hash.
        BadPassword => "bad_password",
        /// The client id is not the login's to use: a device's differs from its username, or a
        /// client asked for another login's id (a device's, the bridge's, another client's
        /// name), or for a persistent session on an id that belongs to nobody (see
        /// `auth::client_id`).
        ClientIdMismatch => "client_id_mismatch",
        /// The last will's topic is not one the identity may publish to.
        WillNotAllowed => "will_not_allowed",
        /// The CONNECT's username, or (in open mode) its client id, is not the vehicle its
        /// TLS client certificate names.
        CertificateMismatch => "certificate_mismatch",
        /// Too many failed logins from the address or for the username lately
        /// (`max_login_failures`): refused before the password was checked.
        Throttled => "throttled",
    }
}

reasons! {
    /// Why a CONNECT was refused before authentication mattered (the `reason` label of
    /// `fleetbeat_broker_connect_refused_total`).
    pub enum ConnectRefusal {
        /// No CONNECT arrived within `connection_timeout_ms`, or the first packet was not one.
        NoConnect => "no_connect",
        /// The CONNECT was malformed, or of another protocol version than the listener's.
        Protocol => "protocol",
        /// Keep-alive 0 ("never time out") from a vehicle: refused, see `docs/broker.md`.
        KeepAliveZero => "keep_alive_zero",
        /// An MQTT 3.1.1 keep-alive beyond
        /// [`BrokerConfig::max_keep_alive_secs`](crate::BrokerConfig::max_keep_alive_secs), or
        /// 0 while a maximum is set (MQTT 5 clients are told the maximum instead).
        KeepAliveTooLong => "keep_alive_too_long",
        /// The client id is unusable: reserved, contains `+ # / $`, or empty without clean
        /// session.
        ClientId => "client_id",
        /// [`BrokerConfig::max_connections`](crate::BrokerConfig::max_connections) reached, or
        /// the router refused the connection.
        ServerFull => "server_full",
        /// The broker is shutting down.
        ShuttingDown => "shutting_down",
        /// A new persistent session beyond
        /// [`BrokerConfig::max_persistent_sessions`](crate::BrokerConfig::max_persistent_sessions).
        SessionsFull => "sessions_full",
        /// Too many connections, in all or from the client's address, had not sent their
        /// CONNECT yet (`max_pending_connects`, `max_pending_connects_per_ip`): closed at once.
        PendingLimit => "pending_limit",
        /// An MQTT 5 CONNECT naming an Authentication Method: the broker has no enhanced
        /// authentication (CONNACK 0x8C).
        AuthMethod => "auth_method",
    }
}

reasons! {
    /// Why an established connection ended (the `reason` label of
    /// `fleetbeat_broker_disconnects_total`).
    pub enum DisconnectReason {
        /// The client sent DISCONNECT.
        Client => "client",
        /// Nothing arrived for 1.5 × the client's keep-alive.
        KeepAlive => "keep_alive",
        /// The socket failed or was closed without DISCONNECT.
        Network => "network",
        /// The client broke the protocol (malformed or oversized packet, second CONNECT, ...).
        Protocol => "protocol",
        /// A new connection with the same client id took over.
        TakenOver => "taken_over",
        /// rumqttd's router dropped the connection.
        Router => "router",
        /// The broker shut down.
        Shutdown => "shutdown",
    }
}

impl DisconnectReason {
    /// Whether the client's last will is published: the connection was lost, not closed
    /// on purpose (DISCONNECT), replaced by the same client, or ended by our shutdown.
    pub const fn fires_will(self) -> bool {
        matches!(
            self,
            DisconnectReason::KeepAlive
                | DisconnectReason::Network
                | DisconnectReason::Protocol
                | DisconnectReason::Router
        )
    }
}

reasons! {
    /// Why a message was not routed (the `reason` label of `fleetbeat_broker_dropped_total`).
    pub enum DropReason {
        /// The publisher may not publish on that topic (its role's topic ACL).
        Acl => "acl",
        /// The packet was larger than `max_payload_size`; the connection was closed.
        Oversized => "oversized",
        /// Published or due for delivery while the broker was shutting down.
        Shutdown => "shutdown",
        /// The JSON mirror could not republish it.
        Mirror => "mirror",
        /// Its MQTT 5 Message Expiry Interval passed while it waited in the front end for
        /// the subscriber (its Receive Maximum, a shared group's member with room; see
        /// `expiry`).
        Expired => "expired",
    }
}

reasons! {
    /// Why a subscription filter was refused although the topic ACL allows it (the `reason`
    /// label of `fleetbeat_broker_subscriptions_refused_total`): the broker does not serve it.
    pub enum SubscribeRefusal {
        /// A malformed shared subscription filter: `$share/` without a group or a filter, a
        /// group with `+` or `#`, an invalid filter (shared subscriptions themselves are
        /// served, see `share`).
        Shared => "shared",
        /// A shared subscription that would create a group beyond `share::MAX_GROUPS`, or
        /// whose group's router link could not be registered.
        SharedGroups => "shared_groups",
        /// Another filter starting with `$` (`$SYS/#`, ...): rumqttd's router would drop the
        /// connection for it.
        DollarTopic => "dollar_topic",
        /// A filter MQTT does not allow (empty, a NUL, `#` not the whole last level, `+` not a
        /// whole level): rumqttd's router would take `#/a` as `#`.
        Invalid => "invalid",
        /// The connection sent SUBSCRIBEs faster than `max_subscribe_rate`.
        Rate => "rate",
        /// The connection already holds `max_subscriptions` filters.
        Filters => "filters",
        /// A filter new to the router while it keeps `max_filters` clients made it keep.
        RouterFilters => "router_filters",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_in_counter_order() {
        for (i, why) in DisconnectReason::ALL.into_iter().enumerate() {
            assert_eq!(why.index(), i);
        }
        assert_eq!(AuthRefusal::ALL.len(), 7);
        assert_eq!(ConnectRefusal::KeepAliveZero.label(), "keep_alive_zero");
        assert_eq!(DropReason::ALL.map(DropReason::label)[3], "mirror");
    }
}
