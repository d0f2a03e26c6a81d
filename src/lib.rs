//! `machine`: the PID 1 of a GPU worker container.
//!
//! It reads and validates its configuration, probes the GPUs and the host, derives the plan of
//! what this machine runs, installs what the connectors need, supervises the services, and runs
//! the workers that claim jobs from the Redis job broker. Each subsystem lives in its own module
//! with a small surface; `cli` is the only entry point the binary calls, and the only module
//! that prints to the operator and chooses exit codes.

pub mod app;
pub mod backoff;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod cloud;
pub mod config;
pub mod connectors;
pub mod gpu;
pub mod health;
pub mod http_client;
pub mod installers;
pub mod logging;
pub mod models;
pub mod plan;
pub mod supervisor;
pub mod worker;
