//! Integration tests: the real `machine` binary and real subsystems against real processes
//! (redis-server, child services, a PID namespace, the protocol fakes of `testkit`, git, pip,
//! npm, Chromium), one module per topic. Each test works in its own temp dir with a hard timeout.

mod config_check;
mod connectors;
mod e2e;
mod external;
mod gpu_health;
mod gpus;
mod hardening;
mod health;
mod installers;
mod lifecycle;
mod matcher;
mod models;
mod playwright;
mod stores;
mod supervisor;
mod support;
mod workers;
