//! Times on the command line of the SOC commands: `--since` and `--until`
//! take an RFC 3339 time (`2026-04-01T09:00:00+09:00`, or a bare date,
//! midnight UTC) or a duration back from now (`90s`, `30m`, `2h`, `7d`),
//! and go to the collector as RFC 3339 in UTC.
//!
//! Small enough to do here rather than pull a date crate into the CLI: the
//! proleptic Gregorian calendar of RFC 3339, years 0000–9999.

use std::{fmt, time::SystemTime};

/// An instant, in UTC, to the nanosecond.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct UtcTime {
    /// Seconds since 1970-01-01T00:00:00Z (negative before).
    secs: i64,
    nanos: u32,
}

/// Seconds from 0000-01-01 to 1970-01-01 and from 1970 to 10000-01-01:
/// the years RFC 3339 can write.
const MIN_SECS: i64 = -62_167_219_200;
const MAX_SECS: i64 = 253_402_300_800;

const EXAMPLES: &str =
    "an RFC 3339 time (2026-04-01T09:00:00Z, 2026-04-01T18:00:00+09:00, 2026-04-01) \
     or a duration back from now (90s, 30m, 2h, 7d)";

impl UtcTime {
    pub fn now() -> Self {
        match SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => Self {
                secs: d.as_secs() as i64,
                nanos: d.subsec_nanos(),
            },
            Err(_) => Self { secs: 0, nanos: 0 },
        }
    }

    #[cfg(test)]
    pub fn from_unix(secs: i64, nanos: u32) -> Self {
        Self { secs, nanos }
    }

    /// `(year, month, day)` of this instant in UTC.
    fn date(self) -> (i64, u32, u32) {
        civil_from_days(self.secs.div_euclid(86_400))
    }

    fn seconds_of_day(self) -> i64 {
        self.secs.rem_euclid(86_400)
    }
}

/// RFC 3339 in UTC (`Z`), with the fraction when there is one, trailing
/// zeros trimmed.
impl fmt::Display for UtcTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.date();
        let s = self.seconds_of_day();
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
            s / 3600,
            s / 60 % 60,
            s % 60
        )?;
        if self.nanos > 0 {
            let fraction = format!("{:09}", self.nanos);
            write!(f, ".{}", fraction.trim_end_matches('0'))?;
        }
        f.write_str("Z")
    }
}

/// `--since` / `--until`, relative to the clock now.
pub fn parse_time(text: &str) -> Result<UtcTime, String> {
    parse_time_at(text, UtcTime::now())
}

/// `--since` / `--until`, relative to `now`. A relative duration is
/// rounded down to the second.
pub fn parse_time_at(text: &str, now: UtcTime) -> Result<UtcTime, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("empty time: give {EXAMPLES}"));
    }
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(0);
    // A number then a unit letter: a duration. A bare number is refused
    // (is `2026` a year or seconds?).
    let is_duration = digits > 0
        && text[digits..].len() == 1
        && text[digits..].chars().all(|c| c.is_ascii_alphabetic());
    if is_duration {
        let back =
            zt_identity::parse_lifetime(text).map_err(|e| format!("{e}; a time is {EXAMPLES}"))?;
        let back = i64::try_from(back.as_secs()).unwrap_or(i64::MAX);
        let secs = now
            .secs
            .checked_sub(back)
            .filter(|s| *s >= MIN_SECS)
            .ok_or_else(|| format!("{text:?} goes back before the year 0"))?;
        return Ok(UtcTime { secs, nanos: 0 });
    }
    if text.len() >= 4 && text.as_bytes()[..4].iter().all(u8::is_ascii_digit) {
        return parse_rfc3339(text).map_err(|e| format!("{text:?}: {e}; a time is {EXAMPLES}"));
    }
    Err(format!("{text:?} is not a time: give {EXAMPLES}"))
}

/// RFC 3339 (`T`, `t` or a space between date and time; `Z`, `z` or an
/// offset), or a bare date (`2026-04-01`, midnight UTC).
pub fn parse_rfc3339(text: &str) -> Result<UtcTime, String> {
    let b = text.as_bytes();
    let number = |range: std::ops::Range<usize>, what: &str| -> Result<u32, String> {
        b.get(range.clone())
            .filter(|s| s.iter().all(u8::is_ascii_digit))
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("expected the {what} at character {}", range.start + 1))
    };
    let expect = |at: usize, allowed: &[u8], what: &str| -> Result<(), String> {
        match b.get(at) {
            Some(c) if allowed.contains(c) => Ok(()),
            _ => Err(format!("expected {what} at character {}", at + 1)),
        }
    };
    let year = number(0..4, "year (4 digits)")?;
    expect(4, b"-", "`-`")?;
    let month = number(5..7, "month (2 digits)")?;
    expect(7, b"-", "`-`")?;
    let day = number(8..10, "day (2 digits)")?;
    if !(1..=12).contains(&month) {
        return Err(format!("month {month} is not 01..12"));
    }
    let last = days_in_month(i64::from(year), month);
    if day == 0 || day > last {
        return Err(format!(
            "day {day} is not in {year:04}-{month:02} (01..{last:02})"
        ));
    }
    let days = days_from_civil(i64::from(year), month, day);
    if b.len() == 10 {
        return Ok(UtcTime {
            secs: days * 86_400,
            nanos: 0,
        });
    }
    expect(10, b"Tt ", "`T` between the date and the time")?;
    let hour = number(11..13, "hour (2 digits)")?;
    expect(13, b":", "`:`")?;
    let minute = number(14..16, "minutes (2 digits)")?;
    expect(16, b":", "`:`")?;
    let second = number(17..19, "seconds (2 digits)")?;
    if hour > 23 || minute > 59 || second > 59 {
        return Err(format!(
            "{hour:02}:{minute:02}:{second:02} is not a time of day"
        ));
    }
    let mut at = 19;
    let mut nanos = 0u32;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            // Nanoseconds; further digits are dropped.
            if at - start < 9 {
                nanos = nanos * 10 + u32::from(b[at] - b'0');
            }
            at += 1;
        }
        if at == start {
            return Err(format!("expected digits after `.` at character {}", at + 1));
        }
        for _ in (at - start)..9 {
            nanos *= 10;
        }
    }
    let offset = match b.get(at) {
        Some(b'Z' | b'z') => {
            at += 1;
            0
        }
        Some(sign @ (b'+' | b'-')) => {
            let sign = if *sign == b'-' { -1 } else { 1 };
            let oh = number(at + 1..at + 3, "offset hours (2 digits)")?;
            expect(at + 3, b":", "`:` in the offset")?;
            let om = number(at + 4..at + 6, "offset minutes (2 digits)")?;
            if oh > 23 || om > 59 {
                return Err(format!("offset {oh:02}:{om:02} is out of range"));
            }
            at += 6;
            sign * i64::from(oh * 3600 + om * 60)
        }
        _ => {
            return Err(format!(
                "expected `Z` or an offset like +09:00 at character {}",
                at + 1
            ))
        }
    };
    if at != b.len() {
        return Err(format!(
            "unexpected text after the time at character {}",
            at + 1
        ));
    }
    let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - offset;
    if !(MIN_SECS..MAX_SECS).contains(&secs) {
        return Err("in UTC it falls outside the years 0000..9999".to_owned());
    }
    Ok(UtcTime { secs, nanos })
}

/// A time as the collector sends it (RFC 3339, nanoseconds), shortened to
/// the second for tables; anything else is shown as it is.
pub fn short(text: &str) -> String {
    match parse_rfc3339(text) {
        Ok(t) => UtcTime { nanos: 0, ..t }.to_string(),
        Err(_) => text.to_owned(),
    }
}

/// The calendar date of an RFC 3339 time as written (in its own offset);
/// for the end of a period given as the next period's first midnight
/// (`2027-04-01T00:00:00+09:00`), the day before.
pub fn date_of(text: &str, period_end: bool) -> String {
    if parse_rfc3339(text).is_err() {
        return text.to_owned();
    }
    let date = &text[..10];
    let midnight = text.len() == 10
        || (text[11..19] == *"00:00:00"
            && text[19..]
                .trim_start_matches('.')
                .trim_start_matches('0')
                .starts_with(|c: char| !c.is_ascii_digit()));
    if period_end && midnight && date.ends_with("-01") {
        if let Ok(t) = parse_rfc3339(date) {
            let (y, m, d) = civil_from_days(t.secs.div_euclid(86_400) - 1);
            return format!("{y:04}-{m:02}-{d:02}");
        }
    }
    date.to_owned()
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-04-10T12:00:00.25Z
    fn now() -> UtcTime {
        UtcTime::from_unix(1_775_822_400, 250_000_000)
    }

    fn at(text: &str) -> String {
        parse_time_at(text, now()).unwrap().to_string()
    }

    #[test]
    fn the_test_clock_is_what_it_says() {
        assert_eq!(now().to_string(), "2026-04-10T12:00:00.25Z");
    }

    #[test]
    fn relative_times_go_back_from_now_to_the_second() {
        assert_eq!(at("90s"), "2026-04-10T11:58:30Z");
        assert_eq!(at("30m"), "2026-04-10T11:30:00Z");
        assert_eq!(at("2h"), "2026-04-10T10:00:00Z");
        assert_eq!(at("7d"), "2026-04-03T12:00:00Z");
        assert_eq!(at("0s"), "2026-04-10T12:00:00Z");
        // Across a year boundary and a leap day.
        assert_eq!(at("100d"), "2025-12-31T12:00:00Z");
        assert_eq!(
            parse_time_at("1d", UtcTime::from_unix(1_709_294_400, 0))
                .unwrap()
                .to_string(),
            "2024-02-29T12:00:00Z"
        );
    }

    #[test]
    fn absolute_times_are_sent_in_utc() {
        assert_eq!(at("2026-04-01T09:00:00Z"), "2026-04-01T09:00:00Z");
        assert_eq!(at("2026-04-01T09:00:00+09:00"), "2026-04-01T00:00:00Z");
        assert_eq!(at("2026-04-01t09:00:00-02:30"), "2026-04-01T11:30:00Z");
        assert_eq!(at("2026-04-01 23:30:00-01:00"), "2026-04-02T00:30:00Z");
        assert_eq!(at("2026-04-01T00:00:00+01:00"), "2026-03-31T23:00:00Z");
        assert_eq!(
            at("2026-04-01T09:00:00.123456789Z"),
            "2026-04-01T09:00:00.123456789Z"
        );
        assert_eq!(at("2026-04-01T09:00:00.5z"), "2026-04-01T09:00:00.5Z");
        // Digits past the nanosecond are dropped.
        assert_eq!(
            at("2026-04-01T09:00:00.1234567891Z"),
            "2026-04-01T09:00:00.123456789Z"
        );
        assert_eq!(at("2026-04-01"), "2026-04-01T00:00:00Z");
        assert_eq!(at("2024-02-29"), "2024-02-29T00:00:00Z");
        assert_eq!(at("1969-12-31T23:59:59Z"), "1969-12-31T23:59:59Z");
        assert_eq!(at("2000-03-01T00:00:00Z"), "2000-03-01T00:00:00Z");
        assert_eq!(
            parse_rfc3339("2026-04-01T09:00:00Z").unwrap(),
            UtcTime::from_unix(1_775_034_000, 0)
        );
    }

    #[test]
    fn garbage_is_refused_with_what_a_time_looks_like() {
        for garbage in ["yesterday", "", "  ", "-2h", "now", "2 h", "1.5h"] {
            let err = parse_time_at(garbage, now()).unwrap_err();
            assert!(
                err.contains("RFC 3339") && err.contains("2h"),
                "{garbage:?}: {err}"
            );
        }
        let err = parse_time_at("2w", now()).unwrap_err();
        assert!(
            err.contains("unknown unit") && err.contains("RFC 3339"),
            "{err}"
        );
        // A bare number: a year or seconds? Refused.
        assert!(parse_time_at("2026", now()).is_err());
        assert!(parse_time_at("3600", now()).is_err());
        let cases = [
            ("2026-13-01T00:00:00Z", "month 13"),
            ("2026-02-29T00:00:00Z", "day 29 is not in 2026-02"),
            ("2026-04-31", "day 31"),
            ("2026-04-01T24:00:00Z", "not a time of day"),
            ("2026-04-01T09:00:00", "expected `Z` or an offset"),
            ("2026-04-01T09:00Z", "expected `:`"),
            ("2026-04-01T09:00:00.Z", "digits after `.`"),
            ("2026-04-01T09:00:00+9:00", "offset hours"),
            ("2026-04-01T09:00:00Zjunk", "unexpected text"),
            ("2026/04/01", "expected `-`"),
            ("0000-01-01T00:00:00+01:00", "outside the years"),
        ];
        for (text, why) in cases {
            let err = parse_time_at(text, now()).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
            assert!(err.contains("RFC 3339"), "{text}: {err}");
        }
        let err = parse_time_at("99999999999999d", now()).unwrap_err();
        assert!(err.contains("too long") || err.contains("before"), "{err}");
    }

    #[test]
    fn the_calendar_round_trips() {
        for days in (-800_000..3_000_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert!((1..=12).contains(&m) && d >= 1 && d <= days_in_month(y, m));
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
    }

    #[test]
    fn shown_times_are_cut_to_the_second() {
        assert_eq!(
            short("2026-04-01T09:00:00.123456789Z"),
            "2026-04-01T09:00:00Z"
        );
        assert_eq!(short(""), "");
        assert_eq!(short("soon"), "soon");
        assert_eq!(date_of("2027-04-01T00:00:00Z", true), "2027-03-31");
        assert_eq!(
            date_of("2027-03-31T23:59:59.999999999Z", true),
            "2027-03-31"
        );
        assert_eq!(date_of("2026-04-01T00:00:00Z", false), "2026-04-01");
        assert_eq!(date_of("2027-04-01T00:00:00.000+09:00", true), "2027-03-31");
        assert_eq!(date_of("2027-04-01T00:00:01+09:00", true), "2027-04-01");
        assert_eq!(date_of("2026-03-01", true), "2026-02-28");
        assert_eq!(date_of("2026-04-01T00:00:00+09:00", false), "2026-04-01");
    }
}
