//! Trace-export settings, read the standard OpenTelemetry way
//! (<https://opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables/>):
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` (a `--otlp-endpoint`
//! flag wins over both), `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER` and `_ARG`,
//! `OTEL_RESOURCE_ATTRIBUTES` (read by the SDK's resource detector), `OTEL_SDK_DISABLED`.
//! Export is off when no endpoint is set.

use std::fmt;

/// Which root decision a sampler makes, and whether a span follows its parent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerKind {
    AlwaysOn,
    AlwaysOff,
    /// Keep this share of traces (by trace id), 0..=1.
    Ratio(f64),
}

/// `OTEL_TRACES_SAMPLER` (+ `_ARG`), parsed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// Spans with a parent (local or remote) follow its decision; a root with links follows
    /// them (a batched engine step is kept when any request it served is).
    pub parent_based: bool,
    /// The decision for roots.
    pub root: SamplerKind,
}

impl SamplerConfig {
    /// True when no span can ever be sampled: the tracing layer is not installed at all, so the
    /// hot path pays only a disabled-callsite branch.
    pub fn never_samples(&self) -> bool {
        !self.parent_based && matches!(self.root, SamplerKind::AlwaysOff | SamplerKind::Ratio(0.0))
    }
}

impl Default for SamplerConfig {
    /// The OpenTelemetry default, `parentbased_always_on`.
    fn default() -> Self {
        SamplerConfig {
            parent_based: true,
            root: SamplerKind::AlwaysOn,
        }
    }
}

/// A misconfiguration, reported at startup.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Where and how to export.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportConfig {
    /// OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    /// `service.name`: `OTEL_SERVICE_NAME`, else the role's default (`moe-router`, ...), unless
    /// `OTEL_RESOURCE_ATTRIBUTES` names one.
    pub service_name: Option<String>,
    pub sampler: SamplerConfig,
}

/// Reads the export settings from `env` (a lookup such as `std::env::var`), with `flag` the
/// `--otlp-endpoint` value. `Ok(None)`: export off.
pub fn from_env(
    flag: Option<&str>,
    default_service: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<ExportConfig>, ConfigError> {
    let get = |k: &str| {
        env(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let endpoint = flag
        .map(str::to_string)
        .filter(|v| !v.is_empty())
        .or_else(|| get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| get("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let Some(endpoint) = endpoint else {
        return Ok(None);
    };
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(ConfigError(format!(
            "OTLP endpoint `{endpoint}` must be a URL such as http://127.0.0.1:4317"
        )));
    }
    let sampler = sampler(get("OTEL_TRACES_SAMPLER"), get("OTEL_TRACES_SAMPLER_ARG"))?;
    let named_in_attributes = get("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| {
        a.split(',')
            .any(|kv| kv.split('=').next().map(str::trim) == Some("service.name"))
    });
    let service_name = match get("OTEL_SERVICE_NAME") {
        Some(n) => Some(n),
        None if named_in_attributes => None,
        None => Some(default_service.to_string()),
    };
    Ok(Some(ExportConfig {
        endpoint,
        service_name,
        sampler,
    }))
}

fn sampler(name: Option<String>, arg: Option<String>) -> Result<SamplerConfig, ConfigError> {
    let ratio = || -> Result<f64, ConfigError> {
        match &arg {
            None => Ok(1.0),
            Some(a) => a
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    ConfigError(format!(
                        "OTEL_TRACES_SAMPLER_ARG must be a ratio in [0, 1], got `{a}`"
                    ))
                }),
        }
    };
    let (parent_based, root) = match name.as_deref().unwrap_or("parentbased_always_on") {
        "always_on" => (false, SamplerKind::AlwaysOn),
        "always_off" => (false, SamplerKind::AlwaysOff),
        "traceidratio" => (false, SamplerKind::Ratio(ratio()?)),
        "parentbased_always_on" => (true, SamplerKind::AlwaysOn),
        "parentbased_always_off" => (true, SamplerKind::AlwaysOff),
        "parentbased_traceidratio" => (true, SamplerKind::Ratio(ratio()?)),
        other => {
            return Err(ConfigError(format!(
                "OTEL_TRACES_SAMPLER `{other}` is not one of always_on, always_off, traceidratio, \
                 parentbased_always_on, parentbased_always_off, parentbased_traceidratio"
            )));
        }
    };
    Ok(SamplerConfig { parent_based, root })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn off_without_an_endpoint() {
        assert_eq!(from_env(None, "moe-router", env(&[])), Ok(None));
        let disabled = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_SDK_DISABLED", "true"),
        ]);
        assert_eq!(from_env(None, "moe-router", disabled), Ok(None));
    }

    #[test]
    fn flag_beats_traces_endpoint_beats_endpoint() {
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:4317"),
        ]);
        let c = from_env(Some("http://c:4317"), "moe-router", &e).expect("ok");
        assert_eq!(c.expect("ok").endpoint, "http://c:4317");
        let c = from_env(None, "moe-router", &e).expect("ok").expect("ok");
        assert_eq!(c.endpoint, "http://b:4317");
        assert_eq!(c.service_name.as_deref(), Some("moe-router"));
        assert_eq!(c.sampler, SamplerConfig::default());
        assert!(from_env(Some("127.0.0.1:4317"), "moe-router", env(&[])).is_err());
    }

    #[test]
    fn service_name_precedence() {
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317");
        let c = from_env(
            None,
            "moe-expert-node",
            env(&[base, ("OTEL_SERVICE_NAME", "x")]),
        );
        assert_eq!(
            c.expect("ok").expect("ok").service_name.as_deref(),
            Some("x")
        );
        let attrs = ("OTEL_RESOURCE_ATTRIBUTES", "a=b, service.name=y");
        let c = from_env(None, "moe-expert-node", env(&[base, attrs]));
        assert_eq!(
            c.expect("ok").expect("ok").service_name,
            None,
            "left to the SDK"
        );
    }

    #[test]
    fn samplers_parse_and_bad_ones_are_refused() {
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317");
        let s = |name: &str, arg: &str| {
            let mut pairs = vec![base, ("OTEL_TRACES_SAMPLER", name)];
            if !arg.is_empty() {
                pairs.push(("OTEL_TRACES_SAMPLER_ARG", arg));
            }
            from_env(None, "r", env(&pairs)).map(|c| c.expect("ok").sampler)
        };
        let got = s("parentbased_traceidratio", "0.25").expect("ok");
        assert_eq!(got.root, SamplerKind::Ratio(0.25));
        assert!(got.parent_based && !got.never_samples());
        assert!(s("always_off", "").expect("ok").never_samples());
        assert!(s("traceidratio", "0").expect("ok").never_samples());
        assert!(!s("parentbased_always_off", "").expect("ok").never_samples());
        assert!(s("traceidratio", "1.5").is_err());
        assert!(s("jaeger_remote", "").is_err());
    }
}
