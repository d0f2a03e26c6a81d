//! The integration tests of `machine`: the real binary and real subsystems against real
//! processes, one module per topic.

mod supervisor;
