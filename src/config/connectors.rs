//! The connector catalogue and the `WORKER_CONNECTORS` syntax (the settings of the external
//! API connectors are in `apis.rs`).
//!
//! `WORKER_CONNECTORS` is a comma-separated list of `name[:count]`, where count is a positive
//! integer up to [`MAX_COUNT`] or `auto`. The parser reports every problem of the list at once, never panics, and
//! [`ConnectorList`]'s `Display` prints a list that parses back to the same value.

use std::fmt;
use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};

/// The largest count one entry may ask for. Each count is that many workers, each with its
/// own Redis worker hash, heartbeat and connections; far more than a machine can use is a
/// typo, not a plan.
pub const MAX_COUNT: u32 = 256;

/// A kind of connector the machine can run jobs through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectorKind {
    /// ComfyUI workflows on a local ComfyUI server per GPU.
    Comfyui,
    /// Automatic1111 txt2img/img2img on a local WebUI server per GPU.
    A1111,
    /// Browser rendering (p5 sketches, HTML, URLs) through the Playwright render service.
    Playwright,
    /// An OpenAI-compatible HTTP API.
    Openai,
    /// Replicate predictions (`api.replicate.com`).
    Replicate,
    /// RunPod serverless endpoint jobs (`api.runpod.ai/v2`).
    Runpod,
    /// Simulated jobs for demos and load tests.
    Simulation,
}

impl ConnectorKind {
    /// Every connector, in catalogue order.
    pub const ALL: [ConnectorKind; 7] = [
        ConnectorKind::Comfyui,
        ConnectorKind::A1111,
        ConnectorKind::Playwright,
        ConnectorKind::Openai,
        ConnectorKind::Replicate,
        ConnectorKind::Runpod,
        ConnectorKind::Simulation,
    ];

    /// The name used in `WORKER_CONNECTORS`.
    pub fn name(self) -> &'static str {
        match self {
            ConnectorKind::Comfyui => "comfyui",
            ConnectorKind::A1111 => "a1111",
            ConnectorKind::Playwright => "playwright",
            ConnectorKind::Openai => "openai",
            ConnectorKind::Replicate => "replicate",
            ConnectorKind::Runpod => "runpod",
            ConnectorKind::Simulation => "simulation",
        }
    }

    /// The job `service_required` values this connector serves.
    pub fn job_services(self) -> &'static [&'static str] {
        match self {
            ConnectorKind::Comfyui => &["comfyui"],
            ConnectorKind::A1111 => &["a1111"],
            ConnectorKind::Playwright => &["playwright", "p5", "html_render"],
            ConnectorKind::Openai => &["openai_text", "openai_image", "openai_img2img", "openai_responses"],
            // Model-family aliases add `replicate:<alias>` services (see `ReplicateConfig`).
            ConnectorKind::Replicate => &["replicate"],
            ConnectorKind::Runpod => &["runpod"],
            ConnectorKind::Simulation => &["simulation"],
        }
    }

    /// Whether the connector calls a paid external API (an API key, fleet-wide limits, a price
    /// table).
    pub fn external_api(self) -> bool {
        matches!(
            self,
            ConnectorKind::Openai | ConnectorKind::Replicate | ConnectorKind::Runpod
        )
    }

    /// Whether the connector occupies a GPU (one heavy job per GPU at a time).
    pub fn gpu_bound(self) -> bool {
        matches!(
            self,
            ConnectorKind::Comfyui | ConnectorKind::A1111 | ConnectorKind::Playwright
        )
    }

    /// Looks a connector up by name, ignoring ASCII case.
    pub fn from_name(name: &str) -> Option<ConnectorKind> {
        Self::ALL.into_iter().find(|k| k.name().eq_ignore_ascii_case(name))
    }

    fn valid_names() -> String {
        Self::ALL.map(ConnectorKind::name).join(", ")
    }
}

impl fmt::Display for ConnectorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One entry of `WORKER_CONNECTORS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectorRequest {
    /// Which connector.
    pub kind: ConnectorKind,
    /// The requested count; `None` means `auto` (the connector's default).
    pub count: Option<NonZeroU32>,
}

/// A parsed, duplicate-free `WORKER_CONNECTORS` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorList(Vec<ConnectorRequest>);

impl ConnectorList {
    /// The list used when `WORKER_CONNECTORS` is empty or unset: `simulation:1`.
    pub fn default_list() -> Self {
        ConnectorList(vec![ConnectorRequest {
            kind: ConnectorKind::Simulation,
            count: NonZeroU32::new(1),
        }])
    }

    /// Parses `name[:count]` entries separated by commas. Blank input gives the default list.
    /// Every problem is returned, each as one sentence naming the offending entry.
    pub fn parse(input: &str) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let mut entries: Vec<ConnectorRequest> = Vec::new();
        for raw in input.split(',') {
            let entry = raw.trim();
            if entry.is_empty() {
                continue;
            }
            let (name, count) = match entry.split_once(':') {
                Some((name, count)) => (name.trim(), Some(count.trim())),
                None => (entry, None),
            };
            let kind = ConnectorKind::from_name(name);
            if kind.is_none() {
                problems.push(format!(
                    "unknown connector `{}` (valid: {})",
                    name.escape_debug(),
                    ConnectorKind::valid_names()
                ));
            }
            let count = match count {
                None => Ok(None),
                Some(c) if c.eq_ignore_ascii_case("auto") => Ok(None),
                Some(c) => match c.parse::<u32>() {
                    Ok(n) if n > MAX_COUNT => Err(format!(
                        "`{}`: count {n} is more than the most a machine runs ({MAX_COUNT})",
                        entry.escape_debug()
                    )),
                    Ok(n) => NonZeroU32::new(n)
                        .map(Some)
                        .ok_or_else(|| format!("`{}`: count must be at least 1", entry.escape_debug())),
                    Err(_) => Err(format!(
                        "`{}`: count `{}` is not a positive integer or `auto`",
                        entry.escape_debug(),
                        c.escape_debug()
                    )),
                },
            };
            let count = count.unwrap_or_else(|p| {
                problems.push(p);
                None
            });
            if let Some(kind) = kind {
                if entries.iter().any(|e| e.kind == kind) {
                    problems.push(format!("connector `{kind}` is listed more than once"));
                } else {
                    entries.push(ConnectorRequest { kind, count });
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        if entries.is_empty() {
            return Ok(Self::default_list());
        }
        Ok(ConnectorList(entries))
    }

    /// The entries in the order they were given.
    pub fn entries(&self) -> &[ConnectorRequest] {
        &self.0
    }

    /// The request for one connector, if listed.
    pub fn get(&self, kind: ConnectorKind) -> Option<&ConnectorRequest> {
        self.0.iter().find(|e| e.kind == kind)
    }
}

impl fmt::Display for ConnectorList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, entry) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match entry.count {
                Some(n) => write!(f, "{}:{n}", entry.kind)?,
                None => write!(f, "{}", entry.kind)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(kind: ConnectorKind, count: Option<u32>) -> ConnectorRequest {
        ConnectorRequest {
            kind,
            count: count.and_then(NonZeroU32::new),
        }
    }

    #[test]
    fn parses_the_documented_forms() {
        let list = ConnectorList::parse(" comfyui:2 , openai:3").unwrap();
        assert_eq!(
            list.entries(),
            &[
                req(ConnectorKind::Comfyui, Some(2)),
                req(ConnectorKind::Openai, Some(3))
            ]
        );
        let list = ConnectorList::parse("comfyui,a1111,playwright,simulation:4").unwrap();
        assert_eq!(list.entries().len(), 4);
        assert_eq!(list.get(ConnectorKind::Simulation).unwrap().count, NonZeroU32::new(4));
        assert_eq!(
            ConnectorList::parse("ComfyUI:auto").unwrap().entries(),
            &[req(ConnectorKind::Comfyui, None)]
        );
    }

    #[test]
    fn empty_means_one_simulation_worker() {
        for input in ["", "  ", ",", " , "] {
            assert_eq!(ConnectorList::parse(input).unwrap(), ConnectorList::default_list());
        }
        assert_eq!(ConnectorList::default_list().to_string(), "simulation:1");
    }

    #[test]
    fn reports_every_problem_with_valid_names() {
        let too_many = ConnectorList::parse("simulation:100000").unwrap_err();
        assert!(too_many[0].contains("256"), "{too_many:?}");
        assert!(ConnectorList::parse(&format!("simulation:{MAX_COUNT}")).is_ok());
        let problems = ConnectorList::parse("comfyui:x,bogus,openai:0,openai").unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].contains("comfyui:x") && problems[0].contains("`x`"));
        assert!(
            problems[1].contains("bogus")
                && problems[1].contains("comfyui, a1111, playwright, openai, replicate, runpod, simulation")
        );
        assert!(problems[2].contains("at least 1"));
        assert!(problems[3].contains("more than once"));
    }

    #[test]
    fn catalogue_matches_the_contract() {
        assert_eq!(
            ConnectorKind::Playwright.job_services(),
            &["playwright", "p5", "html_render"]
        );
        assert!(ConnectorKind::Comfyui.gpu_bound() && !ConnectorKind::Openai.gpu_bound());
    }

    fn arb_list() -> impl Strategy<Value = ConnectorList> {
        proptest::sample::subsequence(ConnectorKind::ALL.to_vec(), 1..=7)
            .prop_flat_map(|kinds| {
                let n = kinds.len();
                (
                    Just(kinds),
                    proptest::collection::vec(proptest::option::of(1u32..=MAX_COUNT), n),
                )
            })
            .prop_map(|(kinds, counts)| ConnectorList(kinds.into_iter().zip(counts).map(|(k, c)| req(k, c)).collect()))
    }

    proptest! {
        #[test]
        fn never_panics(input in ".{0,64}") {
            let _ = ConnectorList::parse(&input);
        }

        #[test]
        fn never_panics_on_near_misses(input in "[a-z0-9:, ]{0,40}") {
            let _ = ConnectorList::parse(&input);
        }

        #[test]
        fn round_trips_what_it_prints(list in arb_list()) {
            let printed = list.to_string();
            prop_assert_eq!(ConnectorList::parse(&printed).unwrap(), list);
        }
    }
}
