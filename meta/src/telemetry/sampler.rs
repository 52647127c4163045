//! The sampler: OpenTelemetry's parent-based sampler
//! (<https://opentelemetry.io/docs/specs/otel/trace/sdk/#parentbased>) with one addition for
//! batched work: a root span with links (an engine step, linked to every request it served)
//! is kept when any linked span is, so a sampled request's steps are never lost to the ratio.

use opentelemetry::trace::{Link, SpanKind, TraceContextExt, TraceId, TraceState};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{Sampler, SamplingDecision, SamplingResult, ShouldSample};

use super::config::{SamplerConfig, SamplerKind};

/// See the module header.
#[derive(Debug, Clone)]
pub struct MoeSampler {
    parent_based: bool,
    root: Sampler,
}

impl MoeSampler {
    /// The sampler `cfg` describes.
    pub fn new(cfg: SamplerConfig) -> MoeSampler {
        let root = match cfg.root {
            SamplerKind::AlwaysOn => Sampler::AlwaysOn,
            SamplerKind::AlwaysOff => Sampler::AlwaysOff,
            SamplerKind::Ratio(r) => Sampler::TraceIdRatioBased(r),
        };
        MoeSampler {
            parent_based: cfg.parent_based,
            root,
        }
    }
}

fn decided(sampled: bool, state: TraceState) -> SamplingResult {
    SamplingResult {
        decision: if sampled {
            SamplingDecision::RecordAndSample
        } else {
            SamplingDecision::Drop
        },
        attributes: Vec::new(),
        trace_state: state,
    }
}

impl ShouldSample for MoeSampler {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        if self.parent_based {
            if let Some(parent) = parent_context.filter(|cx| cx.has_active_span()) {
                let sc = parent.span().span_context().clone();
                if sc.is_valid() {
                    return decided(sc.is_sampled(), sc.trace_state().clone());
                }
            }
            if !links.is_empty() {
                let any = links.iter().any(|l| l.span_context.is_sampled());
                return decided(any, TraceState::default());
            }
        }
        self.root
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags};

    fn sc(sampled: bool) -> SpanContext {
        SpanContext::new(
            TraceId::from(7u128),
            SpanId::from(9u64),
            if sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            },
            true,
            TraceState::default(),
        )
    }

    fn decide(s: &MoeSampler, parent: Option<SpanContext>, links: Vec<Link>) -> bool {
        let cx = parent.map(|p| Context::new().with_remote_span_context(p));
        let r = s.should_sample(
            cx.as_ref(),
            TraceId::from(u128::MAX),
            "x",
            &SpanKind::Internal,
            &[],
            &links,
        );
        r.decision == SamplingDecision::RecordAndSample
    }

    #[test]
    fn parents_then_links_then_ratio() {
        let never = MoeSampler::new(SamplerConfig {
            parent_based: true,
            root: SamplerKind::Ratio(0.0),
        });
        assert!(!decide(&never, None, vec![]), "root: ratio 0");
        assert!(decide(&never, Some(sc(true)), vec![]), "sampled parent");
        assert!(!decide(&never, Some(sc(false)), vec![]), "unsampled parent");
        let links = vec![Link::with_context(sc(false)), Link::with_context(sc(true))];
        assert!(decide(&never, None, links), "one sampled link keeps a step");
        let unsampled = vec![Link::with_context(sc(false))];
        assert!(!decide(&never, None, unsampled));

        let always = MoeSampler::new(SamplerConfig {
            parent_based: false,
            root: SamplerKind::AlwaysOn,
        });
        assert!(decide(&always, Some(sc(false)), vec![]), "ignores parents");
    }
}
