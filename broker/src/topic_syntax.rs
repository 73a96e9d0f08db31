//! What MQTT allows as a topic name and as a topic filter (3.1.1 §4.7, 5 §4.7). The front
//! end checks both before anything reaches rumqttd's router, which takes malformed ones as
//! they come: it drops the connection (every device's, for the shared link) for a bad topic
//! name, and reads a filter such as `#/a` as `#`.

/// Whether `topic` may be published to: not empty, UTF-8, no wildcard, no NUL.
pub(crate) fn valid_topic_name(topic: &[u8]) -> bool {
    !topic.is_empty()
        && std::str::from_utf8(topic).is_ok()
        && !topic.iter().any(|&b| b == b'+' || b == b'#' || b == 0)
}

/// Whether `filter` is a valid topic filter: not empty, no NUL, `#` only as the whole last
/// level, `+` only as a whole level.
pub(crate) fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let valid = if level.contains('#') {
            level == "#" && levels.peek().is_none()
        } else {
            !level.contains('+') || level == "+"
        };
        if !valid {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert!(valid_topic_name(b"fleet/a/b/status"));
        assert!(valid_topic_name(b"/"));
        assert!(!valid_topic_name(b""));
        assert!(!valid_topic_name(b"fleet/+/b/status"));
        assert!(!valid_topic_name(b"fleet/#"));
        assert!(!valid_topic_name(b"a/\0b"));
        assert!(!valid_topic_name(&[0xff, 0xfe]));
    }

    #[test]
    fn topic_filters() {
        for valid in [
            "#", "+", "/", "+/+", "a/+/b", "a/#", "+/#", "/#", "a//b", "$SYS/#",
        ] {
            assert!(valid_filter(valid), "{valid}");
        }
        for invalid in [
            "", "a/b#", "a/#/b", "#/a", "##", "a+/b", "a/+b", "++", "a/\0b",
        ] {
            assert!(!valid_filter(invalid), "{invalid:?}");
        }
    }
}
