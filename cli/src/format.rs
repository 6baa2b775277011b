//! Text for people: ages the way kubectl writes them, and tables aligned the way kubectl
//! aligns them, so that `kubectl weir jobs` reads like `kubectl get`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// A span of seconds as kubectl's AGE column writes it (`45s`, `3m20s`, `12m`, `5h10m`, `3d4h`,
/// `120d`, `2y10d`): precise when short, coarser as it grows. A time a little in the future
/// (clocks of two machines) is `0s`; one further ahead is `<invalid>`, as kubectl says.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    if secs < 0 {
        return "0s".into();
    }
    if secs < 120 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        return match secs % 60 {
            0 => format!("{minutes}m"),
            s => format!("{minutes}m{s}s"),
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        return match minutes % 60 {
            0 => format!("{hours}h"),
            m => format!("{hours}h{m}m"),
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    let days = hours / 24;
    if hours < 24 * 8 {
        return match hours % 24 {
            0 => format!("{days}d"),
            h => format!("{days}d{h}h"),
        };
    }
    if days < 365 * 2 {
        return format!("{days}d");
    }
    let years = days / 365;
    if days < 365 * 8 {
        return match days % 365 {
            0 => format!("{years}y"),
            d => format!("{years}y{d}d"),
        };
    }
    format!("{years}y")
}

/// How long ago `t` was, at `now`.
pub fn age(t: &Time, now: Timestamp) -> String {
    human_duration(now.duration_since(t.0).as_secs())
}

/// An optional time's age, or `<unknown>` as kubectl writes a missing one.
pub fn age_of(t: Option<&Time>, now: Timestamp) -> String {
    t.map_or_else(|| "<unknown>".into(), |t| age(t, now))
}

/// A size in bytes, in binary units (`512 B`, `1.5 KiB`, `20.0 MiB`).
pub fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// A table with a header row; columns are separated by three spaces and padded to the widest
/// cell, the last one left unpadded (kubectl's tabwriter settings).
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self { rows: vec![header.iter().map(|h| h.to_string()).collect()] }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, each ending in a newline.
    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| self.rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max())
            .map(Option::unwrap_or_default)
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if c + 1 < row.len() {
                    let pad = widths[c] - cell.chars().count() + 3;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectls() {
        let cases = [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (59, "59s"),
            (119, "119s"),
            (120, "2m"),
            (200, "3m20s"),
            (600, "10m"),
            (179 * 60 + 59, "179m"),
            (3 * 3600, "3h"),
            (5 * 3600 + 10 * 60, "5h10m"),
            (8 * 3600, "8h"),
            (47 * 3600, "47h"),
            (3 * 86_400 + 4 * 3600, "3d4h"),
            (2 * 86_400, "2d"),
            (120 * 86_400, "120d"),
            (2 * 365 * 86_400 + 10 * 86_400, "2y10d"),
            (9 * 365 * 86_400, "9y"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(secs), want, "{secs} s");
        }
    }

    #[test]
    fn an_age_counts_from_the_time_to_now() {
        let now = Timestamp::from_second(10_000).unwrap();
        let t = Time(Timestamp::from_second(10_000 - 200).unwrap());
        assert_eq!(age(&t, now), "3m20s");
        assert_eq!(age_of(None, now), "<unknown>");
    }

    #[test]
    fn sizes_are_in_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(20 * 1024 * 1024), "20.0 MiB");
    }

    #[test]
    fn columns_are_aligned_three_spaces_apart_and_lines_carry_no_trailing_space() {
        let mut t = Table::new(&["NAME", "PHASE", "AGE"]);
        t.row(vec!["wordcount".into(), "Running".into(), "5m".into()]);
        t.row(vec!["wc".into(), "-".into(), "12s".into()]);
        assert_eq!(
            t.render(),
            "NAME        PHASE     AGE\n\
             wordcount   Running   5m\n\
             wc          -         12s\n"
        );
    }

    #[test]
    fn an_empty_last_cell_leaves_no_trailing_space() {
        let mut t = Table::new(&["A", "B"]);
        t.row(vec!["x".into(), String::new()]);
        assert_eq!(t.render(), "A   B\nx\n");
    }
}
