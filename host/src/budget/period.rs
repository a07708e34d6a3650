//! The periods limits are counted over: clock minutes, UTC days and UTC calendar months. A
//! period is a window `[start, end)` of Unix seconds; its start names its counter.

/// Seconds in a day.
const DAY: i64 = 86_400;

/// How long a limit's counter runs before it starts again from zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    /// A clock minute (TPM, RPM).
    Minute,
    /// A UTC day.
    Day,
    /// A UTC calendar month.
    Month,
}

/// One period: `[start, end)` in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    /// Its first second.
    pub start: i64,
    /// The first second of the next one.
    pub end: i64,
}

impl Period {
    /// The window of this period that holds the Unix second `now`.
    pub fn window(self, now: i64) -> Window {
        match self {
            Period::Minute => {
                let start = now - now.rem_euclid(60);
                Window { start, end: start + 60 }
            }
            Period::Day => {
                let start = now - now.rem_euclid(DAY);
                Window { start, end: start + DAY }
            }
            Period::Month => {
                let (year, month, _) = civil_from_days(now.div_euclid(DAY));
                let next = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
                Window { start: days_from_civil(year, month, 1) * DAY, end: days_from_civil(next.0, next.1, 1) * DAY }
            }
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day counted from 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    // Both in range by construction: day 1..=31, month 1..=12.
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix seconds of a UTC date and time.
    fn at(year: i64, month: u32, day: u32, secs: i64) -> i64 {
        days_from_civil(year, month, day) * DAY + secs
    }

    #[test]
    fn the_calendar_round_trips() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        // 2000-03-01 is day 11017; 2024-02-29 exists.
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for days in [-800_000, -1, 0, 59, 11_016, 19_782, 1_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    }

    #[test]
    fn windows_hold_their_second_and_end_where_the_next_starts() {
        let now = at(2024, 2, 29, 13 * 3600 + 7 * 60 + 42);
        assert_eq!(Period::Minute.window(now), Window { start: now - 42, end: now - 42 + 60 });
        assert_eq!(Period::Day.window(now), Window { start: at(2024, 2, 29, 0), end: at(2024, 3, 1, 0) });
        assert_eq!(Period::Month.window(now), Window { start: at(2024, 2, 1, 0), end: at(2024, 3, 1, 0) });
        let december = at(2023, 12, 31, DAY - 1);
        assert_eq!(Period::Month.window(december), Window { start: at(2023, 12, 1, 0), end: at(2024, 1, 1, 0) });
        for period in [Period::Minute, Period::Day, Period::Month] {
            let w = period.window(now);
            assert_eq!(period.window(w.end).start, w.end, "{period:?}");
            assert_eq!(period.window(w.end - 1), w, "{period:?}");
        }
    }
}
