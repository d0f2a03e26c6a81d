//! The one integration-test binary of `machine`: real subsystems and the real binary against
//! real processes (a private `redis-server` per test), each test in its own temp dir with a
//! hard timeout.

mod matcher;
