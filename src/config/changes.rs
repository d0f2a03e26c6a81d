//! What differs between a running configuration and a new one, compared as typed values.
//!
//! Every field of [`MachineConfig`] and [`PlanConfig`] is named once in the table at the bottom,
//! with what a change of it means; the table destructures both types exhaustively, so a new
//! field does not compile until it is given a place there.

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

/// Generates [`Config::changes`] from one table of the fields. (`machine config check --diff`
/// asks the running machine, which compares typed configurations with this same function.)
macro_rules! changes {
    (
        restart: { $($machine:ident),* $(,)? }
        plan: { $($plan:ident => $kind:expr),* $(,)? }
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
                    let kind: Option<ConnectorKind> = $kind;
                    changes.connectors.extend(kind);
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
        connectors => None,
        services => None,
        install => None,
        comfyui => Some(ConnectorKind::Comfyui),
        a1111 => Some(ConnectorKind::A1111),
        playwright => Some(ConnectorKind::Playwright),
        openai => Some(ConnectorKind::Openai),
        replicate => Some(ConnectorKind::Replicate),
        runpod => Some(ConnectorKind::Runpod),
        simulation => Some(ConnectorKind::Simulation),
        models => Some(ConnectorKind::Comfyui),
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
