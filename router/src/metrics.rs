//! Every metric the router exports, by name and with its help text, in one place, and the
//! Prometheus recorder. All names start with `moe_`, carry base units (`_seconds`, `_bytes`,
//! `_total` for counters) and only labels of bounded cardinality (`node` is an expert node's
//! address, `layer` a MoE layer, `status`/`error_type` a fixed set). Dashboards read these names.

use std::sync::OnceLock;

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests finished, by `status` (HTTP code) and `error_type`.
pub const REQUESTS: &str = "moe_requests_total";
/// Seconds from arrival to the first generated token.
pub const TTFT: &str = "moe_time_to_first_token_seconds";
/// Seconds per output token after the first.
pub const TPOT: &str = "moe_time_per_output_token_seconds";
/// End-to-end request latency.
pub const E2E: &str = "moe_request_latency_seconds";
/// Prompt tokens processed.
pub const PROMPT_TOKENS: &str = "moe_prompt_tokens_total";
/// Tokens generated.
pub const GENERATED_TOKENS: &str = "moe_generation_tokens_total";
/// Sequences in the running batch.
pub const RUNNING: &str = "moe_running_sequences";
/// Sequences waiting for admission.
pub const WAITING: &str = "moe_waiting_sequences";
/// Sequences per engine step.
pub const BATCH_SEQUENCES: &str = "moe_batch_sequences";
/// Tokens per engine step (decode tokens plus prefill chunks).
pub const BATCH_TOKENS: &str = "moe_batch_tokens";
/// Engine step duration.
pub const STEP_SECONDS: &str = "moe_step_seconds";
/// KV-cache tokens in pages held by sequences (pages × tokens per page).
pub const KV_USED_TOKENS: &str = "moe_kv_cache_used_tokens";
/// KV-cache capacity in tokens (pages × tokens per page).
pub const KV_CAPACITY_TOKENS: &str = "moe_kv_cache_capacity_tokens";
/// Share of the KV pages held by sequences, 0..1.
pub const KV_USAGE: &str = "moe_kv_cache_usage_ratio";
/// KV pages in the prefix index (shared or evictable).
pub const KV_CACHED_PAGES: &str = "moe_kv_cache_prefix_pages";
/// Full prompt pages looked up in the prefix index.
pub const PREFIX_QUERIES: &str = "moe_prefix_cache_queries_total";
/// Full prompt pages found in the prefix index (reused, not recomputed).
pub const PREFIX_HITS: &str = "moe_prefix_cache_hits_total";
/// `PREFIX_HITS / PREFIX_QUERIES` since start, 0..1.
pub const PREFIX_HIT_RATE: &str = "moe_prefix_cache_hit_rate";
/// Sequences preempted (their pages freed, recomputed when resumed) because pages ran out.
pub const PREEMPTIONS: &str = "moe_kv_preemptions_total";
/// Sequences cancelled because their client went away.
pub const CANCELLED: &str = "moe_cancelled_sequences_total";
/// Dispatch round trip to one expert node, by `node`.
pub const DISPATCH_LATENCY: &str = "moe_dispatch_latency_seconds";
/// (token, expert) pairs sent to one expert node, by `node`.
pub const DISPATCH_PAIRS: &str = "moe_dispatch_expert_tokens_total";
/// Hidden-state bytes exchanged with one expert node, by `node` and `direction`
/// (`sent`, `received`).
pub const DISPATCH_BYTES: &str = "moe_dispatch_bytes_total";
/// Dispatches sent to a node and not yet answered, by `node`.
pub const DISPATCH_IN_FLIGHT: &str = "moe_dispatch_in_flight";
/// Balancedness (mean node load / max node load) of one MoE layer over the router's load
/// window under the active placement and its shares, by `layer`.
pub const LAYER_BALANCEDNESS: &str = "moe_expert_load_balancedness";
/// Share of a layer's tokens taken by its hottest expert over the window, by `layer`.
pub const HOTTEST_SHARE: &str = "moe_expert_load_hottest_share";
/// Dispatches re-routed away from a failed node, by `node`.
pub const DISPATCH_FAILOVERS: &str = "moe_dispatch_failovers_total";
/// Times a node was quarantined for a bad answer (error, wrong size, non-finite, timeout), by
/// `node`.
pub const DISPATCH_QUARANTINES: &str = "moe_dispatch_quarantines_total";
/// 1 while a node is quarantined, by `node`.
pub const DISPATCH_QUARANTINED: &str = "moe_dispatch_quarantined";
/// Requests to a node hedged to another replica for being late, by `node` (the late one).
pub const DISPATCH_HEDGES: &str = "moe_dispatch_hedges_total";
/// Times a node was marked slow (hedged repeatedly) and avoided, by `node`.
pub const DISPATCH_SLOW: &str = "moe_dispatch_slow_total";
/// 1 while a node is avoided for being slow, by `node`.
pub const DISPATCH_AVOIDED: &str = "moe_dispatch_avoided";
/// 1 while a node does not host every expert the placement gives it, by `node`.
pub const DISPATCH_MISMATCHED: &str = "moe_dispatch_node_mismatched";
/// Sequences failed because experts they needed had no reachable replica.
pub const DISPATCH_FAILED_SEQUENCES: &str = "moe_dispatch_failed_sequences_total";
/// Placement version this router dispatches by.
pub const PLACEMENT_VERSION: &str = "moe_placement_version";
/// Authenticated API requests, by `key` (the first 8 hex digits of the key's SHA-256).
pub const API_KEY_REQUESTS: &str = "moe_api_key_requests_total";
/// Requests refused for a missing, malformed or unknown API key, by `reason`.
pub const API_AUTH_FAILURES: &str = "moe_api_auth_failures_total";
/// Times the API key file was re-read with new keys.
pub const API_KEY_RELOADS: &str = "moe_api_key_reloads_total";
/// Connections the API listener closed without serving, by `reason` (`per_ip_limit`,
/// `tls_handshake`, `plaintext_on_https`).
pub const CONNECTIONS_REFUSED: &str = "moe_http_connections_refused_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// Registers every family's help text and unit with the installed recorder.
fn describe() {
    use metrics::{describe_counter as c, describe_gauge as g, describe_histogram as h};
    c!(
        REQUESTS,
        "Requests finished, by HTTP status and error type."
    );
    c!(
        API_KEY_REQUESTS,
        "Authenticated API requests, by key id (a hash prefix, never the key)."
    );
    c!(
        API_AUTH_FAILURES,
        "Requests refused for a missing, malformed or unknown API key, by reason."
    );
    c!(
        API_KEY_RELOADS,
        "Times the API key file was re-read with new keys."
    );
    c!(
        CONNECTIONS_REFUSED,
        "Connections the API listener closed without serving, by reason."
    );
    h!(
        TTFT,
        Unit::Seconds,
        "Time from arrival to the first generated token."
    );
    h!(
        TPOT,
        Unit::Seconds,
        "Time per output token after the first, per request."
    );
    h!(E2E, Unit::Seconds, "End-to-end request latency.");
    c!(PROMPT_TOKENS, Unit::Count, "Prompt tokens prefilled.");
    c!(GENERATED_TOKENS, Unit::Count, "Tokens generated.");
    g!(RUNNING, "Sequences in the running batch.");
    g!(WAITING, "Sequences waiting for admission.");
    h!(BATCH_SEQUENCES, "Sequences per engine step.");
    h!(
        BATCH_TOKENS,
        "Tokens per engine step (decode tokens plus prefill chunks)."
    );
    h!(STEP_SECONDS, Unit::Seconds, "Engine step duration.");
    g!(
        KV_USED_TOKENS,
        "KV-cache tokens in pages held by sequences."
    );
    g!(KV_CAPACITY_TOKENS, "KV-cache capacity in tokens.");
    g!(
        KV_USAGE,
        "Share of the KV-cache pages held by sequences, 0 to 1."
    );
    g!(KV_CACHED_PAGES, "KV-cache pages in the prefix index.");
    c!(
        PREFIX_QUERIES,
        "Full prompt pages looked up in the prefix cache."
    );
    c!(PREFIX_HITS, "Full prompt pages found in the prefix cache.");
    g!(
        PREFIX_HIT_RATE,
        "Prefix-cache hits per page looked up since start, 0 to 1."
    );
    c!(
        PREEMPTIONS,
        "Sequences preempted for KV pages (recomputed when resumed)."
    );
    c!(
        CANCELLED,
        "Sequences cancelled because their client went away."
    );
    h!(
        DISPATCH_LATENCY,
        Unit::Seconds,
        "Dispatch round trip to one expert node, by node."
    );
    c!(
        DISPATCH_PAIRS,
        "(token, expert) pairs sent to one expert node, by node."
    );
    c!(
        DISPATCH_BYTES,
        Unit::Bytes,
        "Hidden-state bytes exchanged with one expert node, by node and direction."
    );
    g!(
        DISPATCH_IN_FLIGHT,
        "Dispatches sent to an expert node and not yet answered, by node."
    );
    g!(
        LAYER_BALANCEDNESS,
        "Mean over max node load of one MoE layer over the load window, by layer (1 is perfectly balanced)."
    );
    g!(
        HOTTEST_SHARE,
        "Share of a layer's routed tokens taken by its hottest expert over the load window, by layer."
    );
    c!(
        DISPATCH_FAILOVERS,
        "Dispatches re-routed away from a failed or disagreeing expert node, by node."
    );
    c!(
        DISPATCH_QUARANTINES,
        "Times an expert node was quarantined for a bad or missing answer, by node."
    );
    g!(
        DISPATCH_QUARANTINED,
        "1 while an expert node is quarantined, by node."
    );
    c!(
        DISPATCH_HEDGES,
        "Dispatches to a late expert node hedged to another replica, by node."
    );
    c!(
        DISPATCH_SLOW,
        "Times an expert node was marked slow and avoided, by node."
    );
    g!(
        DISPATCH_AVOIDED,
        "1 while an expert node is avoided for being slow, by node."
    );
    g!(
        DISPATCH_MISMATCHED,
        "1 while an expert node does not host every expert the placement gives it (checked on each connection), by node."
    );
    c!(
        DISPATCH_FAILED_SEQUENCES,
        "Sequences failed because experts they needed had no reachable replica."
    );
    g!(
        PLACEMENT_VERSION,
        "Placement version this router dispatches by."
    );
}

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Prefix("moe_batch_".into()), COUNT_BUCKETS)
                });
            let handle = match builder.and_then(|b| b.install_recorder()) {
                Ok(h) => h,
                // Another recorder is installed (tests embedding several servers): render an
                // unattached one so /metrics still answers.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            };
            describe();
            // Counters that may stay at zero are exported from the start, so rate() over them
            // has data and a first event is not lost to a missing previous sample.
            metrics::counter!(CANCELLED).absolute(0);
            metrics::counter!(DISPATCH_FAILED_SEQUENCES).absolute(0);
            metrics::counter!(PREEMPTIONS).absolute(0);
            handle
        })
        .clone()
}

/// Exports the per-node counters of a newly known expert node at zero.
pub fn new_node(node: &str) {
    metrics::counter!(DISPATCH_FAILOVERS, "node" => node.to_string()).absolute(0);
    metrics::counter!(DISPATCH_PAIRS, "node" => node.to_string()).absolute(0);
    metrics::gauge!(DISPATCH_IN_FLIGHT, "node" => node.to_string()).set(0.0);
    metrics::counter!(DISPATCH_QUARANTINES, "node" => node.to_string()).absolute(0);
    metrics::gauge!(DISPATCH_QUARANTINED, "node" => node.to_string()).set(0.0);
    metrics::counter!(DISPATCH_HEDGES, "node" => node.to_string()).absolute(0);
    metrics::counter!(DISPATCH_SLOW, "node" => node.to_string()).absolute(0);
    metrics::gauge!(DISPATCH_AVOIDED, "node" => node.to_string()).set(0.0);
    metrics::gauge!(DISPATCH_MISMATCHED, "node" => node.to_string()).set(0.0);
}

/// The whole `/metrics` exposition: the router's families plus the process, build and
/// trace-export families every role shares.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    text.push_str(&moe_meta::telemetry::process::render("router"));
    text
}

/// Counts a connection the API listener closed without serving it.
pub fn connection_refused(reason: &'static str) {
    metrics::counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}
