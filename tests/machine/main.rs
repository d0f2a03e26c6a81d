//! Integration tests: the real `machine` binary and real subsystems against real processes
//! (redis-server, child services, a PID namespace, the protocol fakes of `testkit`, git, pip,
//! npm, Chromium), one module per topic. Each test works in its own temp dir with a hard timeout.

mod cli;
mod config_check;
mod connectors;
mod deploy;
mod e2e;
mod external;
mod faults;
mod fleet;
mod gpu_health;
mod gpus;
mod guarantees;
mod hardening;
mod health;
mod installers;
mod layering;
mod lifecycle;
mod logs;
mod matcher;
mod metrics;
mod models;
mod page;
mod pipeline;
mod playwright;
mod reload;
mod self_healing;
mod sentinel;
mod stores;
mod supervisor;
mod support;
mod workers;
