//! What differs between a running configuration and a new one, compared as typed values.
//!
//! Every field of [`MachineConfig`] and [`PlanConfig`] is named once in the table at the bottom,
//! with what a change of it means; the table destructures both types exhaustively, so a new
//! field does not compile until it is given a place there. The credentials are one of those
//! fields: compared as typed values like the rest, a rotated API key rebuilds its connector's
//! workers, and a storage key is renewed in place (`WorkerPool::renew_credentials`).

use std::collections::BTreeSet;
use std::time::Duration;

use super::connectors::ConnectorKind;
use super::model::{Config, MachineConfig, PlanConfig};

/// What differs between two configurations, beyond the plan (whose difference is the plan's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// The machine-wide settings that changed, by their key: a reload keeps them as they run,
    /// they apply at the next restart.
    pub restart: Vec<&'static str>,
    /// The connectors whose settings outside the plan changed: their workers are rebuilt.
    pub connectors: BTreeSet<ConnectorKind>,
}

impl MachineConfig {
    /// The new lease when `new` differs from this one in `[worker]` by its lease alone: the
    /// one machine-wide setting a reload may apply in place.
    pub fn lease_alone_changed(&self, new: &MachineConfig) -> Option<Duration> {
        let mut same_lease = new.worker.clone();
        same_lease.lease = self.worker.lease;
        (new.worker.lease != self.worker.lease && same_lease == self.worker).then_some(new.worker.lease)
    }
}

/// What a change of one setting the plan is built from rebuilds, beyond the plan's own diff.
#[derive(Debug, Clone, Copy)]
enum Rebuild {
    /// Nothing running: the plan's diff shows the change (connectors, services), or only what
    /// a reload installs uses it.
    Nothing,
    /// The workers running this connector.
    Workers(ConnectorKind),
    /// The workers of each external connector whose API key changed. The object stores' keys
    /// are renewed in place, and every reload reads the models catalogue and its tokens again
    /// into the running models store, so neither rebuilds a worker.
    ApiKeys,
}

impl Rebuild {
    fn connectors(self, old: &PlanConfig, new: &PlanConfig) -> Vec<ConnectorKind> {
        match self {
            Rebuild::Nothing => Vec::new(),
            Rebuild::Workers(kind) => vec![kind],
            Rebuild::ApiKeys => [ConnectorKind::Openai, ConnectorKind::Replicate, ConnectorKind::Runpod]
                .into_iter()
                .filter(|kind| old.api_key(*kind) != new.api_key(*kind))
                .collect(),
        }
    }
}

impl PlanConfig {
    /// The API key an external connector runs with: the secret its `api_key_env` names.
    fn api_key(&self, kind: ConnectorKind) -> Option<&str> {
        let var = match kind {
            ConnectorKind::Openai => &self.openai.api_key_env,
            ConnectorKind::Replicate => &self.replicate.api_key_env,
            ConnectorKind::Runpod => &self.runpod.api_key_env,
            _ => return None,
        };
        self.credentials.get(var)
    }
}

/// Generates [`Config::changes`] from one table of the fields. (`machine config check --diff`
/// asks the running machine, which compares typed configurations with this same function.)
macro_rules! changes {
    (
        restart: { $($machine:ident),* $(,)? }
        plan: { $($plan:ident => $rebuild:expr),* $(,)? }
    ) => {
        impl Config {
            /// What changed from this (running) configuration to `new`.
            pub fn changes(&self, new: &Config) -> Changes {
                // Exhaustive: a field missing from the table is a compile error here.
                let MachineConfig { $($machine: _),* } = &self.machine;
                let PlanConfig { $($plan: _),* } = &self.plan;
                let mut changes = Changes::default();
                $(if self.machine.$machine != new.machine.$machine {
                    changes.restart.push(stringify!($machine));
                })*
                $(if self.plan.$plan != new.plan.$plan {
                    let rebuild: Rebuild = $rebuild;
                    changes.connectors.extend(rebuild.connectors(&self.plan, &new.plan));
                })*
                changes
            }
        }
    };
}

changes! {
    restart: {
        machine_id, workspace, redis, health_port, gpu, visible_devices, install_timeout, log,
        supervisor, control_token, health_access, worker,
    }
    // What a change of each setting the plan is built from rebuilds beyond the plan's own diff.
    // `connectors` and `services` are the plan: its diff shows them. `install` is what the
    // installers of connectors a reload adds install; it changes no running worker.
    plan: {
        connectors => Rebuild::Nothing,
        services => Rebuild::Nothing,
        install => Rebuild::Nothing,
        comfyui => Rebuild::Workers(ConnectorKind::Comfyui),
        a1111 => Rebuild::Workers(ConnectorKind::A1111),
        playwright => Rebuild::Workers(ConnectorKind::Playwright),
        openai => Rebuild::Workers(ConnectorKind::Openai),
        replicate => Rebuild::Workers(ConnectorKind::Replicate),
        runpod => Rebuild::Workers(ConnectorKind::Runpod),
        simulation => Rebuild::Workers(ConnectorKind::Simulation),
        models => Rebuild::Workers(ConnectorKind::Comfyui),
        credentials => Rebuild::ApiKeys,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_sort_connectors_from_restart_only() {
        let old = Config::for_tests(&[("OPENAI_API_KEY", "k")]);
        let mut new = old.clone();
        new.plan.openai.base_url = "http://b".to_owned();
        new.machine.health_port = 2;
        let changes = old.changes(&new);
        assert_eq!(changes.connectors, BTreeSet::from([ConnectorKind::Openai]));
        assert_eq!(changes.restart, ["health_port"]);
        assert_eq!(old.changes(&old), Changes::default());
    }

    /// The credentials are compared as the other settings are: a rotated API key rebuilds its
    /// connector's workers and nothing else; a rotated storage key rebuilds nothing (the reload
    /// renews it in place); the control token, the health server's, applies at a restart.
    #[test]
    fn credentials_are_diffed_as_typed_settings() {
        let with = |pairs: &[(&str, &str)]| Config::for_tests(pairs);
        let old = with(&[("OPENAI_API_KEY", "k1"), ("AWS_SECRET_ACCESS_KEY", "s1")]);
        let rotated_api = with(&[("OPENAI_API_KEY", "k2"), ("AWS_SECRET_ACCESS_KEY", "s1")]);
        assert_eq!(
            old.changes(&rotated_api),
            Changes {
                restart: Vec::new(),
                connectors: BTreeSet::from([ConnectorKind::Openai]),
            }
        );
        let rotated_store = with(&[("OPENAI_API_KEY", "k1"), ("AWS_SECRET_ACCESS_KEY", "s2")]);
        assert_ne!(old.plan.credentials, rotated_store.plan.credentials);
        assert_eq!(old.changes(&rotated_store), Changes::default());
        let token = with(&[
            ("OPENAI_API_KEY", "k1"),
            ("AWS_SECRET_ACCESS_KEY", "s1"),
            ("MACHINE_CONTROL_TOKEN", "t"),
        ]);
        assert_eq!(old.changes(&token).restart, ["control_token"]);
        assert!(old.changes(&token).connectors.is_empty());
    }

    #[test]
    fn a_lease_alone_is_told_from_other_worker_settings() {
        let old = Config::for_tests(&[]).machine;
        let mut new = old.clone();
        new.worker.lease += Duration::from_secs(1);
        assert_eq!(old.lease_alone_changed(&new), Some(new.worker.lease));
        new.worker.drain += Duration::from_secs(1);
        assert_eq!(old.lease_alone_changed(&new), None);
        assert_eq!(old.lease_alone_changed(&old), None);
    }
}
