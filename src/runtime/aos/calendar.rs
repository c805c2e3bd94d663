//! Pure UTC calendar arithmetic for the time imports: `struct tm` from seconds, the
//! `new Date(y, mon, mday, h, m, s)` normalisation of `mktime`, and the glue's `strftime`.
//! The process runs in UTC: no DST, offset 0 (the spec's §9.5).

const WEEKDAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
const MONTHS: [&str; 12] =
    ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];

/// The fields of C's `struct tm` the glue reads and writes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tm {
    pub sec: i32,
    pub min: i32,
    pub hour: i32,
    pub mday: i32,
    /// 0..=11
    pub mon: i32,
    /// Years since 1900.
    pub year: i32,
    /// 0 = Sunday.
    pub wday: i32,
    /// 0..=365
    pub yday: i32,
    pub gmtoff: i64,
    pub zone: String,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (`month` 1..=12).
pub fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date (`year`, `month` 1..=12, `day`) of a day number since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

pub fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

/// `gmtime` of `secs` since the epoch.
pub fn tm_from_unix(secs: i64) -> Tm {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    Tm {
        sec: (rem % 60) as i32,
        min: (rem / 60 % 60) as i32,
        hour: (rem / 3600) as i32,
        mday: d as i32,
        mon: (m - 1) as i32,
        year: (y - 1900) as i32,
        wday: (days + 4).rem_euclid(7) as i32,
        yday: (days - days_from_civil(y, 1, 1)) as i32,
        gmtoff: 0,
        zone: String::new(),
    }
}

/// `mktime` in UTC: normalises out-of-range fields like JS `new Date(year+1900, mon, mday, hour,
/// min, sec)` and returns the seconds and the normalised `tm`; `None` when the date is outside
/// JS's range (±8.64e15 ms).
pub fn mktime(tm: &Tm) -> Option<(i64, Tm)> {
    let year = i64::from(tm.year) + 1900 + i64::from(tm.mon).div_euclid(12);
    let mon = i64::from(tm.mon).rem_euclid(12);
    let day = days_from_civil(year, mon + 1, 1) + i64::from(tm.mday) - 1;
    let secs = day * 86_400 + i64::from(tm.hour) * 3600 + i64::from(tm.min) * 60 + i64::from(tm.sec);
    if secs.unsigned_abs() > 8_640_000_000_000 {
        return None;
    }
    Some((secs, tm_from_unix(secs)))
}

fn pad(v: i64, width: usize, fill: char) -> String {
    let s = v.to_string();
    if s.len() >= width { s } else { std::iter::repeat_n(fill, width - s.len()).chain(s.chars()).collect() }
}

/// ISO 8601 week number and week-based year.
fn iso_week(tm: &Tm) -> (i64, i64) {
    let year = i64::from(tm.year) + 1900;
    let wday = (i64::from(tm.wday) + 6).rem_euclid(7); // Monday = 0
    let week = (i64::from(tm.yday) - wday + 10) / 7;
    let weeks_in = |y: i64| {
        let jan1 = (days_from_civil(y, 1, 1) + 3).rem_euclid(7); // Monday = 0
        if jan1 == 3 || (jan1 == 2 && is_leap(y)) { 53 } else { 52 }
    };
    if week < 1 {
        (year - 1, weeks_in(year - 1))
    } else if week > weeks_in(year) {
        (year + 1, 1)
    } else {
        (year, week)
    }
}

/// The glue's `strftime`: expand the composite specifiers, then replace each `%x` it knows; an
/// unknown specifier stays as written.
pub fn strftime(format: &str, tm: &Tm) -> String {
    const EXPANSIONS: &[(&str, &str)] = &[
        ("%c", "%a %b %d %H:%M:%S %Y"),
        ("%D", "%m/%d/%y"),
        ("%F", "%Y-%m-%d"),
        ("%h", "%b"),
        ("%r", "%I:%M:%S %p"),
        ("%R", "%H:%M"),
        ("%T", "%H:%M:%S"),
        ("%x", "%m/%d/%y"),
        ("%X", "%H:%M:%S"),
        ("%Ec", "%c"),
        ("%EC", "%C"),
        ("%Ex", "%m/%d/%y"),
        ("%EX", "%H:%M:%S"),
        ("%Ey", "%y"),
        ("%EY", "%Y"),
        ("%Od", "%d"),
        ("%Oe", "%e"),
        ("%OH", "%H"),
        ("%OI", "%I"),
        ("%Om", "%m"),
        ("%OM", "%M"),
        ("%OS", "%S"),
        ("%Ou", "%u"),
        ("%OU", "%U"),
        ("%OV", "%V"),
        ("%Ow", "%w"),
        ("%OW", "%W"),
        ("%Oy", "%y"),
    ];
    let mut pattern = format.to_owned();
    for (from, to) in EXPANSIONS {
        pattern = pattern.replace(from, to);
    }
    let pattern = pattern.replace("%%", "\0\0");
    let year = i64::from(tm.year) + 1900;
    let wday = tm.wday.rem_euclid(7) as usize;
    let mon = tm.mon.rem_euclid(12) as usize;
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(&spec) = chars.peek() else {
            out.push('%');
            break;
        };
        let text = match spec {
            'a' => WEEKDAYS[wday][..3].to_owned(),
            'A' => WEEKDAYS[wday].to_owned(),
            'b' => MONTHS[mon][..3].to_owned(),
            'B' => MONTHS[mon].to_owned(),
            'C' => pad(year / 100, 2, '0'),
            'd' => pad(tm.mday.into(), 2, '0'),
            'e' => pad(tm.mday.into(), 2, ' '),
            'g' => iso_week(tm).0.to_string().chars().skip(2).collect(),
            'G' => iso_week(tm).0.to_string(),
            'H' => pad(tm.hour.into(), 2, '0'),
            'I' => pad(
                match tm.hour {
                    0 => 12,
                    h if h > 12 => i64::from(h) - 12,
                    h => h.into(),
                },
                2,
                '0',
            ),
            'j' => pad(i64::from(tm.yday) + 1, 3, '0'),
            'm' => pad(i64::from(tm.mon) + 1, 2, '0'),
            'M' => pad(tm.min.into(), 2, '0'),
            'n' => "\n".to_owned(),
            'p' => (if (0..12).contains(&tm.hour) { "AM" } else { "PM" }).to_owned(),
            'S' => pad(tm.sec.into(), 2, '0'),
            't' => "\t".to_owned(),
            'u' => (if tm.wday == 0 { 7 } else { tm.wday }).to_string(),
            'U' => pad((i64::from(tm.yday) + 7 - i64::from(tm.wday)).div_euclid(7), 2, '0'),
            'V' => pad(iso_week(tm).1, 2, '0'),
            'w' => tm.wday.to_string(),
            'W' => pad((i64::from(tm.yday) + 7 - (i64::from(tm.wday) + 6) % 7).div_euclid(7), 2, '0'),
            'y' => year.to_string().chars().skip(2).collect(),
            'Y' => year.to_string(),
            'z' => {
                let off = tm.gmtoff.abs() / 60;
                format!("{}{:04}", if tm.gmtoff >= 0 { '+' } else { '-' }, off / 60 * 100 + off % 60)
            }
            'Z' => tm.zone.clone(),
            _ => {
                out.push('%');
                continue;
            }
        };
        chars.next();
        out.push_str(&text);
    }
    out.replace("\0\0", "%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip() {
        for days in [-800_000, -1, 0, 1, 59, 365, 10_957, 19_675, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn gmtime_fields() {
        // 2023-11-14T22:13:20Z, a Tuesday, day 318 of the year.
        let tm = tm_from_unix(1_700_000_000);
        assert_eq!((tm.year, tm.mon, tm.mday, tm.hour, tm.min, tm.sec, tm.wday, tm.yday), (123, 10, 14, 22, 13, 20, 2, 317));
        let epoch = tm_from_unix(10);
        assert_eq!((epoch.year, epoch.mon, epoch.mday, epoch.wday, epoch.yday, epoch.sec), (70, 0, 1, 4, 0, 10));
        let before = tm_from_unix(-1);
        assert_eq!((before.year, before.mon, before.mday, before.hour, before.wday), (69, 11, 31, 23, 3));
    }

    #[test]
    fn mktime_normalises_like_js_date() {
        let tm = Tm { year: 123, mon: 13, mday: 32, hour: 25, min: 0, sec: 0, ..Tm::default() };
        let (secs, norm) = mktime(&tm).unwrap();
        // 2024-02-32 25:00 = 2024-03-03 25:00 (a leap year) = 2024-03-04 01:00.
        assert_eq!((norm.year, norm.mon, norm.mday, norm.hour), (124, 2, 4, 1));
        assert_eq!(secs, days_from_civil(2024, 3, 4) * 86_400 + 3600);
        assert_eq!((norm.wday, norm.yday), (1, 63));
        assert_eq!(mktime(&Tm { year: 300_000, ..Tm::default() }), None);
    }

    #[test]
    fn strftime_specifiers() {
        let mut tm = tm_from_unix(1_700_000_000);
        tm.zone = "UTC".to_owned();
        assert_eq!(strftime("%Y-%m-%d", &tm), "2023-11-14");
        assert_eq!(strftime("%c", &tm), "Tue Nov 14 22:13:20 2023");
        assert_eq!(strftime("%I %p %j %e %u %w %y %C %Z %z %%d", &tm), "10 PM 318 14 2 2 23 20 UTC +0000 %d");
        assert_eq!(strftime("%V %G %U %W", &tm), "46 2023 46 46");
        assert_eq!(strftime("%q", &tm), "%q");
        let epoch = tm_from_unix(0);
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S %A %B", &epoch), "1970-01-01 00:00:00 Thursday January");
        // 2021-01-01 (a Friday) belongs to ISO week 53 of 2020.
        let tm = tm_from_unix(days_from_civil(2021, 1, 1) * 86_400);
        assert_eq!(strftime("%G-W%V", &tm), "2020-W53");
    }
}
