//! Reading a Prometheus text scrape strictly: a series that is not there fails the test naming
//! it, so a renamed or never-registered metric cannot pass for a zero.

use std::fmt;

/// One `/metrics` answer.
pub struct Scrape(String);

/// `GET url`: answered 200 in the text exposition format.
pub async fn scrape(url: &str) -> Scrape {
    let resp = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(resp.status(), 200, "GET {url}");
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("text/plain"),
        "GET {url}: {content_type}"
    );
    Scrape(resp.text().await.unwrap())
}

impl Scrape {
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The value of `series` (`name` or `name{label="…",…}`, labels as rendered); panics naming
    /// the series when the scrape has no such line.
    #[track_caller]
    pub fn value(&self, series: &str) -> f64 {
        self.value_or_absent(series)
            .unwrap_or_else(|| panic!("series `{series}` is absent from the scrape:\n{}", self.0))
    }

    /// The value of `series`, `None` when the scrape has no such line (a labelled series appears
    /// only once something touched it).
    pub fn value_or_absent(&self, series: &str) -> Option<f64> {
        self.0.lines().find_map(|line| {
            let value = line.strip_prefix(series)?.strip_prefix(' ')?;
            let value = value.split(' ').next()?;
            Some(
                value
                    .parse()
                    .unwrap_or_else(|e| panic!("series `{series}` has value {value:?}: {e}")),
            )
        })
    }

    /// Panics unless the scrape lacks `series`.
    #[track_caller]
    pub fn assert_absent(&self, series: &str) {
        if let Some(value) = self.value_or_absent(series) {
            panic!(
                "series `{series}` should be absent, it is {value}:\n{}",
                self.0
            );
        }
    }

    /// The name of every series line (labels and value left off), in order.
    pub fn series_names(&self) -> Vec<&str> {
        self.0
            .lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| line.split(['{', ' ']).next().unwrap_or_default())
            .collect()
    }

    /// Panics unless every series carries the application prefix (`clickstream_`) but the
    /// process collector's (`process_*`), and those are there.
    #[track_caller]
    pub fn assert_prefixed(&self) {
        let names = self.series_names();
        let stray: Vec<&&str> = names
            .iter()
            .filter(|n| !n.starts_with("clickstream_") && !n.starts_with("process_"))
            .collect();
        assert!(stray.is_empty(), "series without the prefix: {stray:?}");
        for process in ["process_cpu_seconds_total", "process_resident_memory_bytes"] {
            assert!(names.contains(&process), "{process} missing:\n{}", self.0);
        }
    }

    pub fn text(&self) -> &str {
        &self.0
    }

    pub fn contains(&self, text: &str) -> bool {
        self.0.contains(text)
    }
}

impl fmt::Display for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP stream_length Entries.\n# TYPE stream_length gauge\n\
        stream_length 4\nstream_length_max 9\nhttp_requests_total{route=\"/batch\",status=\"200\"} 1\n";

    #[test]
    fn a_series_is_read_by_its_whole_name() {
        let scrape = Scrape::new(TEXT);
        assert_eq!(scrape.value("stream_length"), 4.0);
        assert_eq!(
            scrape.value("http_requests_total{route=\"/batch\",status=\"200\"}"),
            1.0
        );
        assert_eq!(scrape.value_or_absent("stream_len"), None);
        scrape.assert_absent("http_requests_total{route=\"/batch\",status=\"500\"}");
    }

    #[test]
    #[should_panic(expected = "series `dlq_length` is absent")]
    fn an_absent_series_is_no_zero() {
        Scrape::new(TEXT).value("dlq_length");
    }
}
