//! [`FileWatch`]: the rule by which the broker and the bridge notice that the credentials file
//! changed: its modification time or size differs from what was seen last, looked at no more
//! than once per [`FileWatch::INTERVAL`] (checked as logins and messages come, no thread).

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

/// Whether a file changed since it was last looked at.
#[derive(Debug, Clone)]
pub struct FileWatch {
    /// Modification time and size when last looked at (`None`: it could not be read).
    stamp: Option<(SystemTime, u64)>,
    /// When it was last looked at.
    looked: Instant,
}

impl FileWatch {
    /// How often at most the file is looked at.
    pub const INTERVAL: Duration = Duration::from_secs(1);

    /// Starts watching `path` as it is now (just loaded).
    pub fn new(path: &Path) -> FileWatch {
        FileWatch {
            stamp: stamp(path),
            looked: Instant::now(),
        }
    }

    /// Whether it is time to look again (no system call).
    pub fn due(&self) -> bool {
        self.looked.elapsed() >= Self::INTERVAL
    }

    /// If it is time ([`Self::due`]), looks at `path`: `true` if it changed since the last
    /// look; the new state is remembered either way (a file that changed into something that
    /// does not load is not read again until it changes again).
    pub fn changed(&mut self, path: &Path) -> bool {
        if !self.due() {
            return false;
        }
        self.looked = Instant::now();
        let now = stamp(path);
        if now == self.stamp {
            return false;
        }
        self.stamp = now;
        true
    }

    /// Makes the next [`Self::changed`] look at once and see a change, even one within the
    /// file system's timestamp granularity (for tests that rewrite a file quickly).
    pub fn expire(&mut self) {
        self.looked = Instant::now()
            .checked_sub(Self::INTERVAL * 2)
            .unwrap_or(self.looked);
        self.stamp = None;
    }
}

/// A file's modification time and size, if it can be read.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_seen_once_and_only_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.toml");
        std::fs::write(&path, "a").unwrap();
        let mut watch = FileWatch::new(&path);
        std::fs::write(&path, "bb").unwrap();
        assert!(!watch.changed(&path), "not due yet");
        watch.looked -= FileWatch::INTERVAL;
        assert!(watch.changed(&path), "the size changed");
        watch.looked -= FileWatch::INTERVAL;
        assert!(!watch.changed(&path), "seen once");
        watch.expire();
        assert!(
            watch.changed(&path),
            "expired: looked at and seen as changed"
        );
    }
}
