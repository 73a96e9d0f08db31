//! Tests of the configuration: defaults, validation, the layers and their errors.

use figment::Jail;

use super::*;

#[test]
fn defaults_listen_on_loopback_with_bounded_memory() {
    let config = BrokerConfig::default();
    assert_eq!(config.v4, "127.0.0.1:1883".parse().unwrap());
    assert_eq!(config.v5, Some("127.0.0.1:1884".parse().unwrap()));
    assert_eq!(
        config.metrics_listen,
        Some("127.0.0.1:9883".parse().unwrap())
    );
    assert_eq!(config.credentials, None, "open mode by default (the demo)");
    assert!(config.json_mirror);
    assert!(config.max_connections >= 20_000);
    assert_eq!(config.max_payload_size, 16 * 1024);
    // Counted bytes one filter may hold: 2 MiB, not rumqttd's example 1 GiB.
    assert_eq!(config.max_segment_size * config.max_segment_count, 2 << 20);
    // A segment of heartbeats (73 counted bytes each) stays within the 1 024 entries rumqttd
    // reserves for it, so its vector never doubles.
    assert!(config.max_segment_size / 73 <= 1024);
    config.validate().unwrap();
}

#[test]
fn ephemeral_uses_port_zero_on_loopback() {
    let config = BrokerConfig::ephemeral();
    assert_eq!(config.v4, "127.0.0.1:0".parse().unwrap());
    assert_eq!(config.v5, Some("127.0.0.1:0".parse().unwrap()));
    assert_eq!(
        config.max_segment_count,
        BrokerConfig::default().max_segment_count
    );
    config.validate().unwrap();
}

#[test]
fn validate_names_the_key_and_the_problem() {
    type BreakIt = fn(&mut BrokerConfig);
    let cases: [(&str, BreakIt); 16] = [
        ("max_segment_size", |c| c.max_segment_size = 512),
        ("max_segment_size", |c| {
            c.max_segment_size = c.max_payload_size - 1
        }),
        ("max_segment_count", |c| c.max_segment_count = 0),
        ("qos1_segment_size", |c| c.qos1_segment_size = 512),
        ("qos1_segment_size", |c| {
            c.qos1_segment_size = c.max_payload_size - 1
        }),
        ("qos1_segment_count", |c| c.qos1_segment_count = 0),
        ("max_connections", |c| c.max_connections = 0),
        ("max_payload_size", |c| c.max_payload_size = 16),
        ("max_outgoing_packet_count", |c| {
            c.max_outgoing_packet_count = 0
        }),
        ("connection_timeout_ms", |c| c.connection_timeout_ms = 0),
        ("listen_v5", |c| c.v5 = Some(c.v4)),
        ("metrics_listen", |c| c.metrics_listen = c.v5),
        ("credentials", |c| c.credentials = Some(PathBuf::new())),
        ("probe_interval", |c| {
            c.probe_interval = Duration::from_millis(10)
        }),
        ("shutdown_grace", |c| c.shutdown_grace = Duration::ZERO),
        ("io_threads", |c| c.io_threads = 100_000),
    ];
    for (field, break_it) in cases {
        let mut config = BrokerConfig::default();
        break_it(&mut config);
        match config.validate() {
            Err(err @ BrokerError::InvalidConfig { field: got, .. }) => {
                assert_eq!(got, field);
                assert!(err.to_string().contains(field), "{err}");
            }
            other => panic!("{field}: expected InvalidConfig, got {other:?}"),
        }
    }
}

#[test]
fn same_ephemeral_address_twice_is_fine() {
    // Port 0 twice means two different free ports.
    BrokerConfig::ephemeral().validate().unwrap();
}

#[test]
fn router_config_has_our_limits() {
    let config = BrokerConfig::default();
    let router = config.router_config(3);
    assert_eq!(router.max_connections, config.max_connections + 3);
    assert_eq!(router.max_segment_size, config.max_segment_size);
    assert_eq!(router.max_segment_count, config.max_segment_count);
    assert_eq!(
        router.max_outgoing_packet_count,
        config.max_outgoing_packet_count
    );
    // Every filter's log is bounded by our numbers, never rumqttd's example ones: the
    // heartbeats' by the defaults, the QoS 1 kinds' by their own smaller pair, so that
    // reconnects (a will and an `online` each) cannot grow them for hours (the soak).
    let custom = router
        .custom_segment
        .as_ref()
        .expect("QoS 1 kinds' segments");
    let mut filters: Vec<&str> = custom.keys().map(String::as_str).collect();
    filters.sort_unstable();
    assert_eq!(
        filters,
        [
            "fleet/+/+/ack",
            "fleet/+/+/cmd",
            "fleet/+/+/event",
            "fleet/+/+/status"
        ]
    );
    for segment in custom.values() {
        assert_eq!(segment.max_segment_size, config.qos1_segment_size);
        assert_eq!(segment.max_segment_count, config.qos1_segment_count);
        assert!(
            segment.max_segment_size * segment.max_segment_count
                <= config.max_segment_size * config.max_segment_count / 8,
            "a QoS 1 kind's log holds at most an eighth of the heartbeats' one"
        );
    }
    assert!(router.initialized_filters.is_none());
}

#[test]
fn default_config_file_is_exactly_the_defaults() {
    let parsed: BrokerConfig = Figment::from(Toml::string(DEFAULT_CONFIG_TOML))
        .extract()
        .unwrap();
    assert_eq!(parsed, BrokerConfig::default());

    // Every key is documented in it (commented out when it has no default value).
    let mut keys: Vec<String> = toml::Table::try_from(BrokerConfig::default())
        .unwrap()
        .keys()
        .cloned()
        .collect();
    keys.push("credentials".to_owned());
    for key in keys {
        assert!(
            DEFAULT_CONFIG_TOML
                .lines()
                .any(|l| l.trim_start_matches("# ").starts_with(&format!("{key} = "))),
            "default-config.toml does not document `{key}`"
        );
    }
}

#[test]
fn durations_have_units() {
    assert_eq!(duration::parse("10s"), Ok(Duration::from_secs(10)));
    assert_eq!(duration::parse("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(duration::parse("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(duration::parse("1h"), Ok(Duration::from_secs(3600)));
    for bad in ["10", "s", "1.5s", "-1s", "10 days", ""] {
        assert!(duration::parse(bad).is_err(), "{bad}");
    }
    assert_eq!(duration::format(Duration::from_secs(10)), "10s");
    assert_eq!(duration::format(Duration::from_millis(1500)), "1500ms");
    assert_eq!(duration::format(Duration::ZERO), "0ms");
}

fn no_overrides() -> ConfigOverrides {
    ConfigOverrides::default()
}

#[test]
#[allow(
    clippy::result_large_err,
    reason = "figment::Jail's closure returns figment::Error"
)]
fn layers_override_in_order() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "broker.toml",
            r#"
            listen = "127.0.0.1:2883"
            listen_v5 = "off"
            max_connections = 100
            max_segment_count = 4
            shutdown_grace = "3s"
            "#,
        )?;
        // Only the file.
        let config = load(Some(Path::new("broker.toml")), &no_overrides()).unwrap();
        assert_eq!(config.v4, "127.0.0.1:2883".parse().unwrap());
        assert_eq!(config.v5, None);
        assert_eq!(config.max_connections, 100);
        assert_eq!(config.shutdown_grace, Duration::from_secs(3));
        assert_eq!(
            config.max_payload_size,
            16 * 1024,
            "untouched keys keep defaults"
        );

        // The environment beats the file.
        jail.set_env("FLEETBEAT_BROKER_MAX_CONNECTIONS", "200");
        jail.set_env("FLEETBEAT_BROKER_LISTEN_V5", "127.0.0.1:2884");
        jail.set_env("FLEETBEAT_BROKER_JSON_MIRROR", "false");
        let config = load(Some(Path::new("broker.toml")), &no_overrides()).unwrap();
        assert_eq!(config.max_connections, 200);
        assert_eq!(config.v5, Some("127.0.0.1:2884".parse().unwrap()));
        assert!(!config.json_mirror);
        assert_eq!(config.max_segment_count, 4);

        // The command line beats both, but only for what was given.
        let overrides = ConfigOverrides {
            max_connections: Some(300),
            listen_v5: Some("off".to_owned()),
            credentials: Some(PathBuf::from("creds.toml")),
            ..ConfigOverrides::default()
        };
        let config = load(Some(Path::new("broker.toml")), &overrides).unwrap();
        assert_eq!(config.max_connections, 300);
        let no_v5 = ConfigOverrides {
            no_v5: true,
            ..ConfigOverrides::default()
        };
        jail.set_env("FLEETBEAT_BROKER_LISTEN_V5", "127.0.0.1:2884");
        assert_eq!(load(None, &no_v5).unwrap().v5, None);
        assert_eq!(config.v5, None);
        assert_eq!(config.credentials, Some(PathBuf::from("creds.toml")));
        assert_eq!(config.max_segment_count, 4);
        assert!(!config.json_mirror);
        Ok(())
    });
}

#[test]
#[allow(
    clippy::result_large_err,
    reason = "figment::Jail's closure returns figment::Error"
)]
fn bad_values_name_the_key_and_the_layer() {
    Jail::expect_with(|jail| {
        jail.create_file("typo.toml", "max_conections = 5\n")?;
        let err = load(Some(Path::new("typo.toml")), &no_overrides()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("max_conections"), "{text}");
        assert!(text.contains("typo.toml"), "{text}");

        jail.create_file("type.toml", "max_connections = \"many\"\n")?;
        let err = load(Some(Path::new("type.toml")), &no_overrides()).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Layer { key: Some(k), .. } if k == "max_connections"),
            "{err:?}"
        );

        jail.create_file("dur.toml", "shutdown_grace = 10\n")?;
        let text = load(Some(Path::new("dur.toml")), &no_overrides())
            .unwrap_err()
            .to_string();
        assert!(text.contains("shutdown_grace"), "{text}");

        jail.create_file("addr.toml", "listen_v5 = \"localhost\"\n")?;
        let text = load(Some(Path::new("addr.toml")), &no_overrides())
            .unwrap_err()
            .to_string();
        assert!(text.contains("listen_v5") && text.contains("off"), "{text}");

        jail.set_env("FLEETBEAT_BROKER_MAX_SEGMENT_COUNT", "lots");
        let text = load(None, &no_overrides()).unwrap_err().to_string();
        assert!(
            text.contains("max_segment_count")
                && text.contains("FLEETBEAT_BROKER_MAX_SEGMENT_COUNT"),
            "{text}"
        );
        jail.set_env("FLEETBEAT_BROKER_MAX_SEGMENT_COUNT", "0");
        let err = load(None, &no_overrides()).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    field: "max_segment_count",
                    ..
                }
            ),
            "{err:?}"
        );
        jail.set_env("FLEETBEAT_BROKER_MAX_SEGMENT_COUNT", "8");

        let overrides = ConfigOverrides {
            shutdown_grace: Some("soon".to_owned()),
            ..ConfigOverrides::default()
        };
        let text = load(None, &overrides).unwrap_err().to_string();
        assert!(
            text.contains("shutdown_grace") && text.contains("command line"),
            "{text}"
        );

        let err = load(Some(Path::new("missing.toml")), &no_overrides()).unwrap_err();
        assert!(matches!(err, ConfigError::File { .. }), "{err:?}");
        Ok(())
    });
}

#[test]
#[allow(
    clippy::result_large_err,
    reason = "figment::Jail's closure returns figment::Error"
)]
fn abuse_limits_come_from_every_layer_and_are_checked() {
    Jail::expect_with(|jail| {
        let defaults = BrokerConfig::default();
        assert_eq!(
            (defaults.max_subscribe_rate, defaults.max_subscriptions),
            (10, 100)
        );
        assert_eq!(
            (
                defaults.max_pending_connects,
                defaults.max_pending_connects_per_ip
            ),
            (2000, 100)
        );
        assert_eq!(defaults.max_login_failures, 10);
        assert_eq!(defaults.login_failure_window, Duration::from_secs(60));
        assert_eq!(defaults.max_password_checks, 0);
        assert_eq!(defaults.max_keep_alive_secs, 0, "no maximum");

        jail.create_file(
            "broker.toml",
            "max_subscriptions = 5\nlogin_failure_window = \"2m\"\n",
        )?;
        jail.set_env("FLEETBEAT_BROKER_MAX_PENDING_CONNECTS_PER_IP", "7");
        jail.set_env("FLEETBEAT_BROKER_MAX_LOGIN_FAILURES", "3");
        let overrides = ConfigOverrides {
            max_subscribe_rate: Some(2),
            max_pending_connects: Some(50),
            max_password_checks: Some(1),
            max_keep_alive_secs: Some(90),
            ..ConfigOverrides::default()
        };
        let config = load(Some(Path::new("broker.toml")), &overrides).unwrap();
        assert_eq!(config.max_subscriptions, 5);
        assert_eq!(config.login_failure_window, Duration::from_secs(120));
        assert_eq!(config.max_pending_connects_per_ip, 7);
        assert_eq!(config.max_login_failures, 3);
        assert_eq!(config.max_subscribe_rate, 2);
        assert_eq!(config.max_pending_connects, 50);
        assert_eq!(config.max_password_checks, 1);
        assert_eq!(config.max_keep_alive_secs, 90);

        for (field, config) in [
            (
                "max_pending_connects",
                BrokerConfig {
                    max_pending_connects: 0,
                    ..BrokerConfig::default()
                },
            ),
            (
                "max_pending_connects_per_ip",
                BrokerConfig {
                    max_pending_connects_per_ip: 0,
                    ..BrokerConfig::default()
                },
            ),
            (
                "login_failure_window",
                BrokerConfig {
                    login_failure_window: Duration::ZERO,
                    ..BrokerConfig::default()
                },
            ),
        ] {
            match config.validate() {
                Err(BrokerError::InvalidConfig { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        Ok(())
    });
}

#[test]
fn a_tls_listener_needs_a_certificate_and_a_key() {
    let tls_addr = Some("127.0.0.1:0".parse().unwrap());
    let field = |config: BrokerConfig| match config.validate() {
        Err(BrokerError::InvalidConfig { field, .. }) => field,
        other => panic!("expected an invalid configuration, got {other:?}"),
    };
    let without_files = BrokerConfig {
        tls_listen: tls_addr,
        ..BrokerConfig::ephemeral()
    };
    assert_eq!(field(without_files.clone()), "tls_cert");
    let without_key = BrokerConfig {
        tls_cert: Some(PathBuf::from("cert.pem")),
        ..without_files.clone()
    };
    assert_eq!(field(without_key.clone()), "tls_key");
    assert_eq!(
        field(BrokerConfig {
            tls_listen: None,
            tls_listen_v5: tls_addr,
            ..without_key.clone()
        }),
        "tls_key"
    );
    let complete = BrokerConfig {
        tls_key: Some(PathBuf::from("key.pem")),
        ..without_key
    };
    complete.validate().unwrap();
    assert_eq!(
        field(BrokerConfig {
            tls_client_certs: ClientCerts::Required,
            ..complete.clone()
        }),
        "tls_client_certs"
    );
    BrokerConfig {
        tls_client_certs: ClientCerts::Required,
        tls_client_ca: Some(PathBuf::from("ca.pem")),
        ..complete.clone()
    }
    .validate()
    .unwrap();
    let taken = "127.0.0.1:8883".parse().unwrap();
    assert_eq!(
        field(BrokerConfig {
            v4: taken,
            tls_listen: Some(taken),
            ..complete.clone()
        }),
        "listen_tls"
    );
    // Files are only needed with a TLS listener.
    BrokerConfig {
        tls_cert: Some(PathBuf::from("cert.pem")),
        ..BrokerConfig::ephemeral()
    }
    .validate()
    .unwrap();
}

#[test]
#[allow(
    clippy::result_large_err,
    reason = "figment::Jail's closure returns figment::Error"
)]
fn tls_keys_come_from_files_environment_and_flags() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "broker.toml",
            "listen_tls = \"0.0.0.0:8883\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n\
             tls_client_certs = \"required\"\ntls_client_ca = \"ca.pem\"\n",
        )?;
        let config = load(Some(Path::new("broker.toml")), &no_overrides()).unwrap();
        assert_eq!(config.tls_listen, Some("0.0.0.0:8883".parse().unwrap()));
        assert_eq!(config.tls_listen_v5, None);
        assert_eq!(config.tls_cert, Some(PathBuf::from("c.pem")));
        assert_eq!(config.tls_client_certs, ClientCerts::Required);

        jail.set_env("FLEETBEAT_BROKER_LISTEN_TLS_V5", "127.0.0.1:8884");
        jail.set_env("FLEETBEAT_BROKER_TLS_KEY", "env-k.pem");
        let config = load(Some(Path::new("broker.toml")), &no_overrides()).unwrap();
        assert_eq!(
            config.tls_listen_v5,
            Some("127.0.0.1:8884".parse().unwrap())
        );
        assert_eq!(config.tls_key, Some(PathBuf::from("env-k.pem")));

        let overrides = ConfigOverrides {
            listen_tls: Some("off".to_owned()),
            tls_cert: Some(PathBuf::from("flag-c.pem")),
            tls_client_ca: Some(PathBuf::from("flag-ca.pem")),
            tls_client_certs: Some(ClientCerts::Optional),
            ..ConfigOverrides::default()
        };
        let config = load(Some(Path::new("broker.toml")), &overrides).unwrap();
        assert_eq!(config.tls_listen, None);
        assert_eq!(config.tls_cert, Some(PathBuf::from("flag-c.pem")));
        assert_eq!(config.tls_client_ca, Some(PathBuf::from("flag-ca.pem")));
        assert_eq!(config.tls_client_certs, ClientCerts::Optional);

        jail.create_file("bad.toml", "listen_tls = \"0.0.0.0:8883\"\n")?;
        jail.clear_env();
        let err = load(Some(Path::new("bad.toml")), &no_overrides()).unwrap_err();
        assert!(err.to_string().contains("tls_cert"), "{err}");
        Ok(())
    });
}
