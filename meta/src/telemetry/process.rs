//! The metric families every role exposes besides its own: process metrics under the names the
//! Prometheus client libraries use (<https://prometheus.io/docs/instrumenting/writing_clientlibs/#process-metrics>),
//! `moe_build_info`, and the trace exporter's counters. Rendered as Prometheus text, read from
//! `/proc/self` on each scrape (nothing is sampled in the background).

use std::fmt::Write;
use std::sync::atomic::Ordering;

/// `moe_build_info`: always 1, labelled with the version and role.
pub const BUILD_INFO: &str = "moe_build_info";
/// Spans handed to the OTLP collector.
pub const OTEL_SPANS_EXPORTED: &str = "moe_otel_spans_exported_total";
/// Spans not exported, by `reason` (`queue_full`, `export_failed`).
pub const OTEL_SPANS_DROPPED: &str = "moe_otel_spans_dropped_total";
/// Resident memory.
pub const PROCESS_RSS: &str = "process_resident_memory_bytes";
/// Private resident memory: anonymous pages (`RssAnon`), what the process allocated itself.
pub const PROCESS_PRIVATE: &str = "moe_process_private_memory_bytes";
/// User plus system CPU time.
pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
/// Open file descriptors.
pub const PROCESS_FDS: &str = "process_open_fds";
/// Operating-system threads.
pub const PROCESS_THREADS: &str = "process_threads";

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The text of the common families, for a process of `role` (`router`, `expert-node`, ...).
pub fn render(role: &str) -> String {
    let mut out = String::new();
    family(
        &mut out,
        BUILD_INFO,
        "gauge",
        "Always 1; labels name the moe-cluster version and the role of this process.",
    );
    let _ = writeln!(
        out,
        "{BUILD_INFO}{{version=\"{}\",role=\"{role}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    let s = super::export::stats();
    family(
        &mut out,
        OTEL_SPANS_EXPORTED,
        "counter",
        "Trace spans handed to the OTLP collector.",
    );
    let _ = writeln!(
        out,
        "{OTEL_SPANS_EXPORTED} {}",
        s.exported.load(Ordering::Relaxed)
    );
    family(
        &mut out,
        OTEL_SPANS_DROPPED,
        "counter",
        "Trace spans not exported: the export queue was full, or the collector failed.",
    );
    let _ = writeln!(
        out,
        "{OTEL_SPANS_DROPPED}{{reason=\"queue_full\"}} {}\n{OTEL_SPANS_DROPPED}{{reason=\"export_failed\"}} {}",
        s.dropped_queue_full.load(Ordering::Relaxed),
        s.failed.load(Ordering::Relaxed)
    );
    super::store_metrics::render(&mut out);
    if let Some(p) = read_proc() {
        family(
            &mut out,
            PROCESS_CPU,
            "counter",
            "Total user and system CPU time spent in seconds.",
        );
        let _ = writeln!(out, "{PROCESS_CPU} {:.2}", p.cpu_seconds);
        family(
            &mut out,
            PROCESS_RSS,
            "gauge",
            "Resident memory size in bytes.",
        );
        let _ = writeln!(out, "{PROCESS_RSS} {}", p.rss_bytes);
        if let Some(private) = private_bytes() {
            family(
                &mut out,
                PROCESS_PRIVATE,
                "gauge",
                "Private resident memory in bytes (anonymous pages: weights, caches and buffers this process allocated; memory-mapped checkpoint pages are not counted).",
            );
            let _ = writeln!(out, "{PROCESS_PRIVATE} {private}");
        }
        family(
            &mut out,
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
        );
        let _ = writeln!(out, "process_virtual_memory_bytes {}", p.vsize_bytes);
        family(
            &mut out,
            PROCESS_THREADS,
            "gauge",
            "Number of OS threads in the process.",
        );
        let _ = writeln!(out, "{PROCESS_THREADS} {}", p.threads);
        family(
            &mut out,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
        );
        let _ = writeln!(
            out,
            "process_start_time_seconds {:.2}",
            p.start_time_seconds
        );
        if let Some(fds) = p.open_fds {
            family(
                &mut out,
                PROCESS_FDS,
                "gauge",
                "Number of open file descriptors.",
            );
            let _ = writeln!(out, "{PROCESS_FDS} {fds}");
        }
        if let Some(max) = p.max_fds {
            family(
                &mut out,
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors.",
            );
            let _ = writeln!(out, "process_max_fds {max}");
        }
    }
    out
}

/// This process's private resident memory, bytes: its anonymous pages (`RssAnon` of
/// `/proc/self/status`), which is what the weights, caches and buffers it allocated occupy.
/// Memory-mapped checkpoint pages are file-backed (the page cache can drop them) and not
/// counted. `None` where `/proc` is not available.
pub fn private_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_rss_anon(&status)
}

fn parse_rss_anon(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What `/proc/self` says about this process.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcStats {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    pub vsize_bytes: u64,
    pub threads: u64,
    pub start_time_seconds: f64,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

/// Clock ticks per second and page size: the values of every Linux on x86-64 and aarch64
/// (`getconf CLK_TCK` and `PAGESIZE`; reading them needs libc, which this crate avoids).
const TICKS: f64 = 100.0;
const PAGE: u64 = 4096;

/// Reads `/proc/self` (None off Linux).
pub fn read_proc() -> Option<ProcStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())
    });
    let mut p = parse_stat(&stat, boot.unwrap_or(0.0))?;
    p.open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64);
    p.max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))?
                .split_whitespace()
                .nth(3)?
                .parse()
                .ok()
        });
    Some(p)
}

/// Parses `/proc/self/stat` (fields after the parenthesised command name, which may hold
/// spaces), with `boot` the boot time in seconds since the epoch.
pub fn parse_stat(stat: &str, boot: f64) -> Option<ProcStats> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of proc(5), so field N is f[N - 3].
    let num = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(ProcStats {
        cpu_seconds: (num(14)? + num(15)?) as f64 / TICKS,
        threads: num(20)?,
        start_time_seconds: boot + num(22)? as f64 / TICKS,
        vsize_bytes: num(23)?,
        rss_bytes: num(24)? * PAGE,
        open_fds: None,
        max_fds: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_spaces_in_the_name() {
        let line = "4242 (moe (expert) node) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 50 0 0 20 0 \
                    7 0 1000 104857600 2560 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 3 0 0 0 0 0";
        let p = parse_stat(line, 1_700_000_000.0).expect("parses");
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.threads, 7);
        assert_eq!(p.start_time_seconds, 1_700_000_010.0);
        assert_eq!(p.vsize_bytes, 104_857_600);
        assert_eq!(p.rss_bytes, 2560 * 4096);
    }

    #[test]
    fn reads_rss_anon_in_kib() {
        let s = "Name:\tmoe\nVmRSS:\t  9000 kB\nRssAnon:\t  2048 kB\nRssFile:\t 100 kB\n";
        assert_eq!(parse_rss_anon(s), Some(2048 * 1024));
        assert_eq!(parse_rss_anon("Name:\tmoe\n"), None);
    }

    #[test]
    fn every_family_has_help_and_type() {
        let text = render("router");
        assert!(text.contains("moe_build_info{version=\""));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
        }
        assert!(text.contains("process_threads "), "{text}");
        assert!(text.contains("moe_process_private_memory_bytes "), "{text}");
    }
}
