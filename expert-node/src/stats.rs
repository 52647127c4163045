//! Every metric an expert node exports, by name and with its help text, in one place: what it
//! has computed (tokens and compute time per layer, attributed to experts by their share of a
//! request's tokens, since a request's experts run as one grouped job), failed dispatches,
//! in-flight work, hosted experts, load and unload events and the placement version, plus the
//! families every role shares ([`moe_meta::telemetry::process`]). Rendered as Prometheus text.
//!
//! Per-(layer, expert) series are opt-in (`--expert-metrics`): a DeepSeek-V3 node can host
//! 58 × 256 pairs, which is too many series to keep by default (vLLM keeps its expert-load
//! metrics opt-in for the same reason); the per-layer series are always there.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// (token, expert) pairs computed, all experts, by `node`.
pub const EXPERT_TOKENS: &str = "moe_node_expert_tokens_total";
/// (token, expert) pairs computed per MoE layer, by `node`, `layer`.
pub const LAYER_TOKENS: &str = "moe_node_layer_tokens_total";
/// Compute time per MoE layer, by `node`, `layer`.
pub const LAYER_COMPUTE: &str = "moe_node_layer_compute_seconds_total";
/// Per (layer, expert) tokens (opt-in), by `node`, `layer`, `expert`.
pub const LAYER_EXPERT_TOKENS: &str = "moe_node_layer_expert_tokens_total";
/// Per (layer, expert) compute time (opt-in), by `node`, `layer`, `expert`.
pub const LAYER_EXPERT_COMPUTE: &str = "moe_node_layer_expert_compute_seconds_total";
/// Dispatch requests answered with an error, by `node`, `code` (gRPC code name).
pub const DISPATCH_ERRORS: &str = "moe_node_dispatch_errors_total";
/// Dispatch requests being computed, by `node`.
pub const IN_FLIGHT: &str = "moe_node_in_flight";
/// Dispatch messages read and not yet answered into the send queue, by `node` (bounded by
/// `--max-in-flight`).
pub const HELD: &str = "moe_node_held_messages";
pub const TLS_REFUSED: &str = "moe_node_tls_connections_refused_total";
/// (layer, expert) pairs hosted, by `node`.
pub const HOSTED: &str = "moe_node_hosted_experts";
/// Bytes of the hosted experts' weights, by `node`.
pub const EXPERT_BYTES: &str = "moe_node_expert_bytes";
/// (layer, expert) pairs loaded since start, by `node`.
pub const LOADS: &str = "moe_node_expert_loads_total";
/// (layer, expert) pairs unloaded since start, by `node`.
pub const UNLOADS: &str = "moe_node_expert_unloads_total";
/// Newest placement version the node serves, by `node`.
pub const PLACEMENT_VERSION: &str = "moe_placement_version";

/// Counters since the node started.
#[derive(Debug, Default)]
pub struct NodeStats {
    per_expert: Mutex<BTreeMap<(usize, usize), (u64, f64)>>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    loads: AtomicU64,
    unloads: AtomicU64,
    per_expert_series: AtomicBool,
}

/// What the node is now, for the gauges.
#[derive(Debug, Clone, Copy)]
pub struct NodeGauges<'a> {
    pub node: &'a str,
    pub in_flight: u64,
    pub held: u64,
    pub hosted: usize,
    pub expert_bytes: u64,
    pub placement_version: u64,
    /// Connections the TLS listener refused, by reason (None: plaintext listener).
    pub tls_refused: Option<[(&'static str, u64); 3]>,
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

impl NodeStats {
    /// Exports per-(layer, expert) series too (`--expert-metrics`).
    pub fn set_per_expert_series(&self, on: bool) {
        self.per_expert_series.store(on, Ordering::Relaxed);
    }

    /// Records one computed request of `layer`: its expert ids (one entry per token and expert)
    /// and the time it took.
    pub fn record(&self, layer: usize, expert_ids: &[u32], took: Duration) {
        if expert_ids.is_empty() {
            return;
        }
        let mut counts: BTreeMap<u32, u64> = BTreeMap::new();
        for &e in expert_ids {
            *counts.entry(e).or_default() += 1;
        }
        let per_token = took.as_secs_f64() / expert_ids.len() as f64;
        let mut m = self.per_expert.lock().unwrap_or_else(|p| p.into_inner());
        for (e, c) in counts {
            let s = m.entry((layer, e as usize)).or_default();
            s.0 += c;
            s.1 += per_token * c as f64;
        }
    }

    /// Records a dispatch answered with `code`.
    pub fn record_error(&self, code: tonic::Code) {
        let name = code_name(code);
        let mut m = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(name).or_default() += 1;
    }

    /// Records `n` (layer, expert) pairs loaded.
    pub fn record_loads(&self, n: usize) {
        self.loads.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Records `n` (layer, expert) pairs unloaded.
    pub fn record_unloads(&self, n: usize) {
        self.unloads.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Prometheus text exposition, labelled with the node id.
    pub fn render(&self, g: NodeGauges<'_>) -> String {
        let node = g.node;
        let m = self.per_expert.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let total: u64 = m.values().map(|v| v.0).sum();
        family(
            &mut out,
            EXPERT_TOKENS,
            "counter",
            "(token, expert) pairs computed, all experts.",
        );
        let _ = writeln!(out, "{EXPERT_TOKENS}{{node=\"{node}\"}} {total}");
        let mut layers: BTreeMap<usize, (u64, f64)> = BTreeMap::new();
        for ((l, _), v) in m.iter() {
            let s = layers.entry(*l).or_default();
            s.0 += v.0;
            s.1 += v.1;
        }
        family(
            &mut out,
            LAYER_TOKENS,
            "counter",
            "(token, expert) pairs computed per MoE layer.",
        );
        for (l, v) in &layers {
            let _ = writeln!(
                out,
                "{LAYER_TOKENS}{{node=\"{node}\",layer=\"{l}\"}} {}",
                v.0
            );
        }
        family(
            &mut out,
            LAYER_COMPUTE,
            "counter",
            "Expert compute time per MoE layer.",
        );
        for (l, v) in &layers {
            let _ = writeln!(
                out,
                "{LAYER_COMPUTE}{{node=\"{node}\",layer=\"{l}\"}} {:.6}",
                v.1
            );
        }
        family(
            &mut out,
            DISPATCH_ERRORS,
            "counter",
            "Dispatch requests answered with an error, by gRPC code.",
        );
        for (code, n) in self.errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(
                out,
                "{DISPATCH_ERRORS}{{node=\"{node}\",code=\"{code}\"}} {n}"
            );
        }
        if let Some(refused) = g.tls_refused {
            family(
                &mut out,
                TLS_REFUSED,
                "counter",
                "Connections the mTLS listener refused, by reason (plaintext client, handshake timeout, failed handshake: no or untrusted certificate, SAN not allowed).",
            );
            for (reason, n) in refused {
                let _ = writeln!(
                    out,
                    "{TLS_REFUSED}{{node=\"{node}\",reason=\"{reason}\"}} {n}"
                );
            }
        }
        let gauges = [
            (
                IN_FLIGHT,
                "gauge",
                "Dispatch requests being computed.",
                g.in_flight,
            ),
            (
                HELD,
                "gauge",
                "Dispatch messages read whose answers are not yet queued to send.",
                g.held,
            ),
            (
                HOSTED,
                "gauge",
                "(layer, expert) pairs hosted.",
                g.hosted as u64,
            ),
            (
                EXPERT_BYTES,
                "gauge",
                "Bytes of the hosted experts' weights in memory.",
                g.expert_bytes,
            ),
            (
                LOADS,
                "counter",
                "(layer, expert) pairs loaded since start.",
                self.loads.load(Ordering::Relaxed),
            ),
            (
                UNLOADS,
                "counter",
                "(layer, expert) pairs unloaded since start.",
                self.unloads.load(Ordering::Relaxed),
            ),
            (
                PLACEMENT_VERSION,
                "gauge",
                "Newest placement version this process serves.",
                g.placement_version,
            ),
        ];
        for (name, kind, help, v) in gauges {
            family(&mut out, name, kind, help);
            let _ = writeln!(out, "{name}{{node=\"{node}\"}} {v}");
        }
        if self.per_expert_series.load(Ordering::Relaxed) {
            let per_expert = |out: &mut String,
                              name: &str,
                              help: &str,
                              value: &dyn Fn(&(u64, f64)) -> String| {
                family(out, name, "counter", help);
                for ((l, e), v) in m.iter() {
                    let _ = writeln!(
                        out,
                        "{name}{{node=\"{node}\",layer=\"{l}\",expert=\"{e}\"}} {}",
                        value(v)
                    );
                }
            };
            per_expert(
                &mut out,
                LAYER_EXPERT_TOKENS,
                "Tokens computed per (layer, expert).",
                &|v| v.0.to_string(),
            );
            per_expert(
                &mut out,
                LAYER_EXPERT_COMPUTE,
                "Compute time per (layer, expert), attributed by token share within each request.",
                &|v| format!("{:.6}", v.1),
            );
        }
        out.push_str(&moe_meta::telemetry::process::render("expert-node"));
        out
    }
}

/// The gRPC code's canonical name (a fixed set: bounded label values).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges() -> NodeGauges<'static> {
        NodeGauges {
            node: "n0",
            in_flight: 2,
            held: 3,
            hosted: 6,
            expert_bytes: 6 << 20,
            placement_version: 4,
            tls_refused: None,
        }
    }

    #[test]
    fn tokens_and_time_are_attributed_by_share() {
        let s = NodeStats::default();
        s.record(1, &[3, 3, 5, 3], Duration::from_millis(8));
        s.record(2, &[3], Duration::from_millis(1));
        s.record_error(tonic::Code::FailedPrecondition);
        let text = s.render(gauges());
        assert!(
            text.contains("moe_node_expert_tokens_total{node=\"n0\"} 5"),
            "{text}"
        );
        assert!(text.contains("moe_node_layer_tokens_total{node=\"n0\",layer=\"1\"} 4"));
        assert!(
            text.contains("moe_node_layer_compute_seconds_total{node=\"n0\",layer=\"1\"} 0.008000")
        );
        assert!(text.contains("moe_node_in_flight{node=\"n0\"} 2"));
        assert!(text.contains("moe_node_held_messages{node=\"n0\"} 3"));
        assert!(text.contains("moe_placement_version{node=\"n0\"} 4"));
        assert!(text.contains(
            "moe_node_dispatch_errors_total{node=\"n0\",code=\"FAILED_PRECONDITION\"} 1"
        ));
        assert!(
            !text.contains(LAYER_EXPERT_TOKENS),
            "per-expert series are opt-in"
        );
        s.set_per_expert_series(true);
        let text = s.render(gauges());
        assert!(text.contains(
            "moe_node_layer_expert_tokens_total{node=\"n0\",layer=\"1\",expert=\"3\"} 3"
        ));
        assert!(text.contains(
            "moe_node_layer_expert_compute_seconds_total{node=\"n0\",layer=\"1\",expert=\"3\"} 0.006000"
        ));
    }
}
