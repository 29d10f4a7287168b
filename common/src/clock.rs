//! The wall clock every Wardgate process reads, with an explicit test hook.
//!
//! Schedules ("Tuesdays 14:00–16:00 Europe/Berlin") and access windows can only be tested
//! end to end if the processes can be made to believe it is Tuesday. So every wall-clock read
//! that matters for access (decisions, grant and session ends, the gateway turning an
//! `expires_at_ms` into a deadline, the client planning its renewal) goes through [`now_ms`].
//!
//! In production that is exactly `SystemTime::now()`. Only a process started with the hidden
//! `--test-clock FILE` flag ([`use_test_clock`]) adds the offset (signed milliseconds, one
//! integer) written in FILE, re-read at every call so a test can move the clock while the
//! processes run. Nothing else (no environment variable, no setting in the store) turns it
//! on, so it cannot be enabled by accident; a process using it logs so at start.
//!
//! Monotonic deadlines are unaffected: the gateway still ends a grant by its own monotonic
//! clock once the grant has arrived, so moving the test clock never extends a grant in force.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::SystemTime;

static TEST_CLOCK: OnceLock<PathBuf> = OnceLock::new();

/// Makes this process read its wall clock as the real one plus the offset in `file`. Call
/// once, at start, and only because the operator passed `--test-clock`. Returns `false` if a
/// test clock was installed already.
pub fn use_test_clock(file: PathBuf) -> bool {
    TEST_CLOCK.set(file).is_ok()
}

/// Whether this process runs on a test clock.
pub fn is_test_clock() -> bool {
    TEST_CLOCK.get().is_some()
}

/// The offset in the test clock file (0 when there is none or it cannot be read: a test that
/// broke its file gets the real time, never a random one).
fn offset_ms() -> i64 {
    TEST_CLOCK
        .get()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch, by this process's clock.
pub fn now_ms() -> i64 {
    crate::unix_ms(SystemTime::now()).saturating_add(offset_ms())
}

/// What a process on the test clock `file` reads now. For tests.
pub fn now_ms_of(file: &std::path::Path) -> i64 {
    let offset = std::fs::read_to_string(file)
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or(0);
    crate::unix_ms(SystemTime::now()).saturating_add(offset)
}

/// Writes the offset that makes processes on the test clock `file` read `fake_now_ms` now.
/// For tests.
pub fn set_test_clock(file: &std::path::Path, fake_now_ms: i64) -> std::io::Result<()> {
    let offset = fake_now_ms - crate::unix_ms(SystemTime::now());
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, offset.to_string())?;
    std::fs::rename(tmp, file)
}

#[cfg(test)]
mod tests {
    #[test]
    fn without_a_test_clock_it_is_the_system_clock() {
        let real = crate::unix_ms(std::time::SystemTime::now());
        let ours = super::now_ms();
        assert!((ours - real).abs() < 1_000);
    }
}
