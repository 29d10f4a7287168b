//! Weekly windows: open and close instants across daylight-saving changes in Europe/Berlin
//! and America/New_York, checked against a minute-by-minute reading of the wall clock.

use jiff::{SignedDuration, Timestamp};

use super::ts;
use crate::policy::window::Windows;
use crate::policy::{Window, WindowError, WindowSpec};

fn window(days: &[&str], start: &str, end: &str, zone: &str) -> Window {
    Window::parse(&WindowSpec::new(days, start, end, zone)).expect("valid window")
}

/// The openings of `w` that start in `[from, to)`, as (open, close) instants, found with
/// `next_start` and `current_end` only.
fn periods(w: &Window, from: Timestamp, to: Timestamp) -> Vec<(Timestamp, Timestamp)> {
    assert!(
        !w.contains(from),
        "start the walk while the window is closed"
    );
    let mut out = Vec::new();
    let mut t = from;
    while let Some(open) = w.next_start(t) {
        if open >= to {
            break;
        }
        let close = w.current_end(open).expect("open at its start");
        out.push((open, close));
        t = close;
    }
    out
}

/// The definition, read independently: the wall clock (via `ZonedDateTime`) shows an allowed
/// day and a time in `[start, end)`.
fn wall_clock_open(
    at: Timestamp,
    zone: &str,
    days: &[jiff::civil::Weekday],
    start: i32,
    end: i32,
) -> bool {
    let tz = crate::policy::time_zone(zone).expect("zone");
    let local = at.to_zoned_datetime(tz).datetime();
    let minute = i32::from(local.hour()) * 60 + i32::from(local.minute());
    days.contains(&local.weekday()) && start <= minute && minute < end
}

#[test]
fn windows_open_and_close_at_the_right_instants_across_dst() {
    use jiff::civil::Weekday::{Sunday, Tuesday};
    struct Case {
        name: &'static str,
        zone: &'static str,
        days: &'static [jiff::civil::Weekday],
        start: &'static str,
        end: &'static str,
        from: &'static str,
        to: &'static str,
        expect: &'static [(&'static str, &'static str)],
    }
    let cases = [
        Case {
            name: "Berlin Tuesdays 14:00–16:00, CET then CEST",
            zone: "Europe/Berlin",
            days: &[Tuesday],
            start: "14:00",
            end: "16:00",
            from: "2025-03-24T00:00:00Z",
            to: "2025-04-02T00:00:00Z",
            expect: &[
                ("2025-03-25T13:00:00Z", "2025-03-25T15:00:00Z"),
                ("2025-04-01T12:00:00Z", "2025-04-01T14:00:00Z"),
            ],
        },
        Case {
            name: "Berlin spring forward: 01:30–03:00 spans the jump (30 real minutes)",
            zone: "Europe/Berlin",
            days: &[Sunday],
            start: "01:30",
            end: "03:00",
            from: "2025-03-29T00:00:00Z",
            to: "2025-03-31T00:00:00Z",
            expect: &[("2025-03-30T00:30:00Z", "2025-03-30T01:00:00Z")],
        },
        Case {
            name: "Berlin spring forward: 02:00–02:30 lies in the skipped hour",
            zone: "Europe/Berlin",
            days: &[Sunday],
            start: "02:00",
            end: "02:30",
            from: "2025-03-29T00:00:00Z",
            to: "2025-03-31T00:00:00Z",
            expect: &[],
        },
        Case {
            name: "Berlin spring forward: 02:30–04:00 opens at the jump",
            zone: "Europe/Berlin",
            days: &[Sunday],
            start: "02:30",
            end: "04:00",
            from: "2025-03-29T00:00:00Z",
            to: "2025-03-31T00:00:00Z",
            expect: &[("2025-03-30T01:00:00Z", "2025-03-30T02:00:00Z")],
        },
        Case {
            name: "Berlin fall back: 01:30–03:00 spans the repeat (2 h 30 min)",
            zone: "Europe/Berlin",
            days: &[Sunday],
            start: "01:30",
            end: "03:00",
            from: "2025-10-25T00:00:00Z",
            to: "2025-10-27T00:00:00Z",
            expect: &[("2025-10-25T23:30:00Z", "2025-10-26T02:00:00Z")],
        },
        Case {
            name: "Berlin fall back: 02:00–02:30 is shown twice by the clock",
            zone: "Europe/Berlin",
            days: &[Sunday],
            start: "02:00",
            end: "02:30",
            from: "2025-10-25T00:00:00Z",
            to: "2025-10-27T00:00:00Z",
            expect: &[
                ("2025-10-26T00:00:00Z", "2025-10-26T00:30:00Z"),
                ("2025-10-26T01:00:00Z", "2025-10-26T01:30:00Z"),
            ],
        },
        Case {
            name: "New York spring forward: 01:30–03:00",
            zone: "America/New_York",
            days: &[Sunday],
            start: "01:30",
            end: "03:00",
            from: "2025-03-08T00:00:00Z",
            to: "2025-03-10T00:00:00Z",
            expect: &[("2025-03-09T06:30:00Z", "2025-03-09T07:00:00Z")],
        },
        Case {
            name: "New York spring forward: all of Sunday is 23 hours",
            zone: "America/New_York",
            days: &[Sunday],
            start: "00:00",
            end: "24:00",
            from: "2025-03-08T00:00:00Z",
            to: "2025-03-10T00:00:00Z",
            expect: &[("2025-03-09T05:00:00Z", "2025-03-10T04:00:00Z")],
        },
        Case {
            name: "New York fall back: 01:00–02:00 stays open through the repeat",
            zone: "America/New_York",
            days: &[Sunday],
            start: "01:00",
            end: "02:00",
            from: "2025-11-01T00:00:00Z",
            to: "2025-11-03T00:00:00Z",
            expect: &[("2025-11-02T05:00:00Z", "2025-11-02T07:00:00Z")],
        },
        Case {
            name: "New York fall back: 00:30–01:30 reopens when the clock goes back",
            zone: "America/New_York",
            days: &[Sunday],
            start: "00:30",
            end: "01:30",
            from: "2025-11-01T00:00:00Z",
            to: "2025-11-03T00:00:00Z",
            expect: &[
                ("2025-11-02T04:30:00Z", "2025-11-02T05:30:00Z"),
                ("2025-11-02T06:00:00Z", "2025-11-02T06:30:00Z"),
            ],
        },
        Case {
            name: "Berlin Tuesdays 14:00–16:00, CEST then CET (October)",
            zone: "Europe/Berlin",
            days: &[Tuesday],
            start: "14:00",
            end: "16:00",
            from: "2025-10-20T00:00:00Z",
            to: "2025-10-29T00:00:00Z",
            expect: &[
                ("2025-10-21T12:00:00Z", "2025-10-21T14:00:00Z"),
                ("2025-10-28T13:00:00Z", "2025-10-28T15:00:00Z"),
            ],
        },
        Case {
            name: "New York Tuesdays 09:00–17:00, EST then EDT",
            zone: "America/New_York",
            days: &[Tuesday],
            start: "09:00",
            end: "17:00",
            from: "2025-03-03T00:00:00Z",
            to: "2025-03-12T00:00:00Z",
            expect: &[
                ("2025-03-04T14:00:00Z", "2025-03-04T22:00:00Z"),
                ("2025-03-11T13:00:00Z", "2025-03-11T21:00:00Z"),
            ],
        },
    ];
    for c in cases {
        let names: Vec<String> = c.days.iter().map(|d| format!("{d:?}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let w = window(&names, c.start, c.end, c.zone);
        let (from, to) = (ts(c.from), ts(c.to));
        let got = periods(&w, from, to);
        let want: Vec<_> = c.expect.iter().map(|(a, b)| (ts(a), ts(b))).collect();
        assert_eq!(got, want, "{}", c.name);

        // Every minute of the range agrees with the wall clock, and with the periods.
        let minutes = |s: &str| {
            let (h, m) = s.split_once(':').expect("HH:MM");
            h.parse::<i32>().expect("h") * 60 + m.parse::<i32>().expect("m")
        };
        let (start, end) = (minutes(c.start), minutes(c.end));
        let mut t = from;
        while t < to {
            let reference = wall_clock_open(t, c.zone, c.days, start, end);
            assert_eq!(w.contains(t), reference, "{} at {t}", c.name);
            let in_periods = got.iter().any(|(a, b)| *a <= t && t < *b);
            assert_eq!(in_periods, reference, "{} at {t}", c.name);
            t += SignedDuration::from_mins(1);
        }
        // And each period is tight: closed just before it opens and when it closes.
        for (open, close) in got {
            assert!(
                !w.contains(open - SignedDuration::from_nanos(1)),
                "{}",
                c.name
            );
            assert!(
                w.contains(close - SignedDuration::from_nanos(1)),
                "{}",
                c.name
            );
            assert!(!w.contains(close), "{}", c.name);
        }
    }
}

#[test]
fn next_start_from_inside_a_window_is_the_following_opening() {
    let w = window(&["tue"], "14:00", "16:00", "Europe/Berlin");
    let inside = ts("2025-03-25T13:30:00Z");
    assert!(w.contains(inside));
    assert_eq!(w.current_end(inside), Some(ts("2025-03-25T15:00:00Z")));
    assert_eq!(w.next_start(inside), Some(ts("2025-04-01T12:00:00Z")));
    assert_eq!(w.current_end(ts("2025-03-25T15:00:00Z")), None, "closed");
}

#[test]
fn adjoining_days_and_windows_count_as_one_opening() {
    let w = window(&["mon-tue"], "00:00", "24:00", "UTC");
    // Monday 24 March 2025 10:00 UTC → open until Wednesday 00:00.
    assert_eq!(
        w.current_end(ts("2025-03-24T10:00:00Z")),
        Some(ts("2025-03-26T00:00:00Z"))
    );
    let union = Windows::new(vec![
        window(&["tue"], "14:00", "16:00", "Europe/Berlin"),
        window(&["tue"], "16:00", "18:00", "Europe/Berlin"),
    ]);
    assert_eq!(
        union.current_end(ts("2025-03-25T13:30:00Z")),
        Some(ts("2025-03-25T17:00:00Z"))
    );
    let overlapping = Windows::new(vec![
        window(&["tue"], "14:00", "16:00", "Europe/Berlin"),
        window(&["tue"], "15:00", "17:00", "UTC"),
    ]);
    assert_eq!(
        overlapping.current_end(ts("2025-03-25T13:30:00Z")),
        Some(ts("2025-03-25T17:00:00Z"))
    );
    let next = union
        .next_opening(ts("2025-03-25T17:00:00Z"))
        .expect("opens");
    assert_eq!(next.at, ts("2025-04-01T12:00:00Z"));
    assert_eq!(next.local, "Tue 1 Apr 2025 14:00 CEST");
}

#[test]
fn an_always_open_window_is_bounded_by_the_horizon_and_never_reopens() {
    let w = window(&["mon-sun"], "00:00", "24:00", "Europe/Berlin");
    let now = ts("2025-03-25T13:30:00Z");
    let end = w.current_end(now).expect("open");
    assert!(end >= now + SignedDuration::from_hours(14 * 24), "{end}");
    assert_eq!(w.next_start(now), None);
}

#[test]
fn specs_parse_names_ranges_and_end_of_day() {
    let cases = [
        (
            vec!["Tuesday"],
            "14:00",
            "16:00",
            "Tuesdays 14:00–16:00 Europe/Berlin",
        ),
        (
            vec!["TUE"],
            "14:00",
            "16:00",
            "Tuesdays 14:00–16:00 Europe/Berlin",
        ),
        (
            vec!["mon-fri"],
            "07:00",
            "19:00",
            "Monday to Friday 07:00–19:00 Europe/Berlin",
        ),
        (
            vec!["sat", "sun"],
            "8:00",
            "24:00",
            "Weekends 08:00–24:00 Europe/Berlin",
        ),
        (
            vec!["fri-mon"],
            "20:00",
            "24:00",
            "Mondays, Fridays, Saturdays, Sundays 20:00–24:00 Europe/Berlin",
        ),
        (
            vec!["mon", "wed"],
            "00:00",
            "06:30",
            "Mondays, Wednesdays 00:00–06:30 Europe/Berlin",
        ),
        (
            vec!["sunday-saturday"],
            "00:00",
            "24:00",
            "Every day 00:00–24:00 Europe/Berlin",
        ),
    ];
    for (days, start, end, text) in cases {
        let w = window(&days, start, end, "europe/berlin");
        assert_eq!(w.to_string(), text);
    }
}

#[test]
fn bad_specs_report_every_problem() {
    let cases: [(WindowSpec, Vec<WindowError>); 7] = [
        (
            WindowSpec::new(&["tuesdy"], "14:00", "16:00", "Europe/Berlin"),
            vec![WindowError::UnknownWeekday("tuesdy".to_owned())],
        ),
        (
            WindowSpec::new(&[], "14:00", "16:00", "Europe/Berlin"),
            vec![WindowError::NoDays],
        ),
        (
            WindowSpec::new(&["tue"], "16:00", "14:00", "Europe/Berlin"),
            vec![WindowError::EndNotAfterStart {
                start: "16:00".to_owned(),
                end: "14:00".to_owned(),
            }],
        ),
        (
            WindowSpec::new(&["tue"], "14:00", "14:00", "Europe/Berlin"),
            vec![WindowError::EndNotAfterStart {
                start: "14:00".to_owned(),
                end: "14:00".to_owned(),
            }],
        ),
        (
            WindowSpec::new(&["tue"], "24:00", "25:00", "Europe/Berlin"),
            vec![
                WindowError::BadTime("24:00".to_owned()),
                WindowError::BadTime("25:00".to_owned()),
            ],
        ),
        (
            WindowSpec::new(&["tue"], "14:00", "16:00", "Europe/Berlln"),
            vec![WindowError::UnknownTimeZone("Europe/Berlln".to_owned())],
        ),
        (
            WindowSpec::new(&["tue", "fry"], "2pm", "16:00", "Etc/Unknown"),
            vec![
                WindowError::UnknownWeekday("fry".to_owned()),
                WindowError::BadTime("2pm".to_owned()),
                WindowError::UnknownTimeZone("Etc/Unknown".to_owned()),
            ],
        ),
    ];
    for (spec, want) in cases {
        let got = Window::parse(&spec).expect_err("invalid");
        assert_eq!(got, want, "{spec:?}");
    }
    assert!(
        WindowError::UnknownWeekday("tuesdy".to_owned())
            .to_string()
            .contains("\"tue\"")
    );
}
