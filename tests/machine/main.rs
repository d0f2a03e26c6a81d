//! The integration tests of `machine`: one binary, one module per topic, each test against real
//! things (redis-server, the protocol fakes of `testkit`) in its own temp dir with a hard timeout.

mod connectors;
