//! Every metric the router exports, by name, in one place, and the Prometheus recorder.
//! All names start with `moe_`.

use std::sync::OnceLock;

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
/// KV-cache tokens reserved by admitted sequences.
pub const KV_USED_TOKENS: &str = "moe_kv_cache_used_tokens";
/// KV-cache capacity in tokens.
pub const KV_CAPACITY_TOKENS: &str = "moe_kv_cache_capacity_tokens";
/// Reserved share of the KV cache, 0..1.
pub const KV_USAGE: &str = "moe_kv_cache_usage_ratio";
/// Sequences cancelled because their client went away.
pub const CANCELLED: &str = "moe_cancelled_sequences_total";
/// Dispatch round trip to one expert node, by `node`.
pub const DISPATCH_LATENCY: &str = "moe_dispatch_latency_seconds";
/// (token, expert) pairs sent to one expert node, by `node`.
pub const DISPATCH_PAIRS: &str = "moe_dispatch_expert_tokens_total";
/// Balancedness (mean node load / max node load) of one MoE layer over the router's load
/// window under the active placement and its shares, by `layer`.
pub const LAYER_BALANCEDNESS: &str = "moe_expert_load_balancedness";
/// Share of a layer's tokens taken by its hottest expert over the window, by `layer`.
pub const HOTTEST_SHARE: &str = "moe_expert_load_hottest_share";
/// Dispatches re-routed away from a failed node, by `node`.
pub const DISPATCH_FAILOVERS: &str = "moe_dispatch_failovers_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

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
            match builder.and_then(|b| b.install_recorder()) {
                Ok(h) => h,
                // Another recorder is installed (tests embedding several servers): render an
                // unattached one so /metrics still answers.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}
