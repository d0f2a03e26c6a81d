//! The one integration-test binary of `machine`: real subsystems and the real binary against
//! real processes (a private `redis-server` per test, the protocol fakes of `testkit`, git, pip,
//! npm, Chromium), each test in its own temp dir with a hard timeout.

mod connectors;
mod installers;
mod matcher;
mod playwright;
