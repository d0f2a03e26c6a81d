//! The integration tests of `machine`: one binary, one module per topic, each test in its own
//! temp dir with a hard timeout, against real processes (git, pip, npm, Chromium, redis-server).

mod installers;
mod playwright;
