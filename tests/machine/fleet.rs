//! Many machines on one Redis: each submission is indexed once for the fleet and wakes one idle
//! worker that can run it; when that worker's machine is gone another takes the job within 2 s;
//! the fleet's indexer dying or Redis restarting loses no job (also with real machines
//! SIGKILLed); a job submitted while every worker is busy goes to the first that frees up, in
//! order.

use std::collections::HashSet;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use machine::broker::{Broker, BrokerOptions, Capabilities, ClaimedJob, NewJob};
use machine::config::RedisUrl;
use serde_json::json;
use testkit::RedisServer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::{subscribed, within};

const LIMIT: Duration = Duration::from_secs(90);

/// Workers that never poll during a test: whatever they claim, a wake-up brought them.
fn no_poll() -> BrokerOptions {
    BrokerOptions {
        safety_poll: Duration::from_secs(60),
        ..BrokerOptions::default()
    }
}

/// One machine's broker (its own connections), its event loop and its sweeper (whose periodic
/// call also tries the fleet's indexer lease).
struct Machine {
    broker: Broker,
    id: String,
    events: JoinHandle<()>,
}

impl Machine {
    async fn start(server: &RedisServer, id: &str, shutdown: &CancellationToken) -> Machine {
        let url = RedisUrl::parse(&server.url()).expect("testkit URLs are valid");
        let broker = Broker::connect(&url, no_poll()).await.expect("connect");
        broker.ensure_functions().await.expect("install the library");
        let events = tokio::spawn({
            let b = broker.clone();
            let s = shutdown.clone();
            async move {
                let (events, sweeper) = tokio::join!(b.run_events(s.clone()), b.run_sweeper(s));
                events.expect("the event loop ends cleanly");
                sweeper.expect("the sweeper ends cleanly");
            }
        });
        Machine {
            broker,
            id: id.to_owned(),
            events,
        }
    }

    /// A worker of this machine waiting for a job.
    fn wait(&self, worker: &str, shutdown: &CancellationToken) -> JoinHandle<Option<ClaimedJob>> {
        self.wait_as(Capabilities::new(worker, self.id.as_str(), &["simulation"]), shutdown)
    }

    /// A worker of this machine with these capabilities waiting for a job.
    fn wait_as(&self, caps: Capabilities, shutdown: &CancellationToken) -> JoinHandle<Option<ClaimedJob>> {
        let b = self.broker.clone();
        let s = shutdown.clone();
        tokio::spawn(async move { b.claim_next(&caps, &s).await.expect("claim_next") })
    }
}

async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

async fn until(what: &str, ok: impl AsyncFnMut() -> bool) {
    until_within(Duration::from_secs(20), what, ok).await;
}

async fn until_within(limit: Duration, what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn parked(conn: &mut redis::aio::MultiplexedConnection) -> usize {
    redis::cmd("HLEN")
        .arg("jobs:idx:parked")
        .query_async(conn)
        .await
        .unwrap()
}

async fn indexers(conn: &mut redis::aio::MultiplexedConnection) -> usize {
    let (_, n): (String, usize) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg("job_submitted")
        .query_async(conn)
        .await
        .unwrap();
    n
}

/// Every command the server runs, as `redis-cli monitor` prints it.
struct Monitor {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Monitor {
    fn start(server: &RedisServer) -> Monitor {
        let mut child = Command::new("redis-cli")
            .arg("-p")
            .arg(server.port().to_string())
            .arg("monitor")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli is installed beside redis-server");
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        std::thread::spawn({
            let lines = lines.clone();
            move || {
                for line in std::io::BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().unwrap().push(line);
                }
            }
        });
        Monitor { child, lines }
    }

    /// How many calls of these library functions it saw so far.
    fn calls(&self, functions: &[&str]) -> usize {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter(|l| functions.iter().any(|f| l.contains(&format!("\"FCALL\" \"{f}\""))))
            .count()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_is_indexed_once_and_wakes_one_idle_worker_of_the_fleet() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let shutdown = CancellationToken::new();
        let mut machines = Vec::new();
        for i in 0..5 {
            machines.push(Machine::start(&server, &format!("m{i}"), &shutdown).await);
        }
        let waiters: Vec<_> = machines
            .iter()
            .map(|m| m.wait(&format!("{}-gpu0", m.id), &shutdown))
            .collect();
        let mut conn = raw(&server).await;
        until("every worker is parked", async || parked(&mut conn).await == 5).await;
        until("one machine indexes for the fleet", async || {
            indexers(&mut conn).await == 1
        })
        .await;
        let monitor = Monitor::start(&server);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let api = &machines[0].broker;
        let submitted = Instant::now();
        let id = api.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let mut claimed = None;
        while claimed.is_none() {
            for w in &waiters {
                if w.is_finished() {
                    claimed = Some(submitted.elapsed());
                }
            }
            assert!(submitted.elapsed() < Duration::from_secs(5), "nobody claimed the job");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let latency = claimed.unwrap();
        // Anything the fleet would still do for this submission happens within this.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let indexed = monitor.calls(&["indexJob", "announceJob"]);
        let claims = monitor.calls(&["findMatchingJob", "claimOrPark"]);
        assert_eq!(indexed, 1, "one index call for the fleet, not one per machine");
        assert_eq!(claims, 1, "one woken worker claims; the other four sleep on");
        assert!(latency < Duration::from_secs(1), "claimed {latency:?} after submission");
        shutdown.cancel();
        let mut got = Vec::new();
        for w in waiters {
            got.extend(w.await.unwrap());
        }
        assert_eq!(got.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), vec![id]);
        for m in machines {
            m.events.await.unwrap();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_woken_machine_is_gone_another_idle_worker_takes_the_job_within_two_seconds() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let shutdown = CancellationToken::new();
        let m = Machine::start(&server, "alive", &shutdown).await;
        let waiter = m.wait("alive-gpu0", &shutdown);
        let mut conn = raw(&server).await;
        until("the live worker is parked", async || parked(&mut conn).await == 1).await;
        until("the machine indexes", async || indexers(&mut conn).await == 1).await;
        // A worker of a machine that was SIGKILLed right after it parked: its entry is the
        // freshest (it parked for long), and nobody hears its machine's wake channel.
        park_a_dead_machines_worker(&mut conn, 600_000).await;
        let mut wakes = subscribed(&server.url(), "jobs:wake:gone").await;
        let submitted = Instant::now();
        let id = m.broker.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let job = waiter.await.unwrap().expect("the live worker takes the job");
        let latency = submitted.elapsed();
        assert_eq!(job.id, id);
        let mut msgs = wakes.on_message();
        let first = tokio::time::timeout(Duration::from_secs(1), futures_util::StreamExt::next(&mut msgs))
            .await
            .expect("the gone machine's worker was woken first")
            .unwrap();
        let doc: serde_json::Value = serde_json::from_str(&first.get_payload::<String>().unwrap()).unwrap();
        assert_eq!(doc["worker_id"], "gone-gpu0");
        assert_eq!(doc["job_id"], id.as_str());
        assert!(
            latency < Duration::from_secs(2),
            "the job waited {latency:?} for another worker"
        );
        shutdown.cancel();
        m.events.await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_indexer_dying_loses_no_job() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let shutdown = CancellationToken::new();
        let mut conn = raw(&server).await;
        let indexer = Machine::start(&server, "a", &shutdown).await;
        until("the first machine indexes", async || indexers(&mut conn).await == 1).await;
        let other = Machine::start(&server, "b", &shutdown).await;
        let waiters: Vec<_> = (0..3).map(|i| other.wait(&format!("b-gpu{i}"), &shutdown)).collect();
        until("its workers are parked", async || parked(&mut conn).await == 3).await;
        // The indexer's machine dies: its subscription goes, its lease stays until it expires.
        indexer.events.abort();
        let _ = indexer.events.await;
        until("the indexer's subscription is gone", async || {
            indexers(&mut conn).await == 0
        })
        .await;
        let api = &other.broker;
        let mut ids = HashSet::new();
        for _ in 0..3 {
            ids.insert(api.submit(&NewJob::new("simulation", json!({}))).await.unwrap());
        }
        let started = Instant::now();
        let mut got = HashSet::new();
        for w in waiters {
            let job = w.await.unwrap().expect("every job is claimed");
            assert!(got.insert(job.id.clone()), "claimed twice: {}", job.id);
        }
        assert_eq!(got, ids);
        // The lease (3 s) runs out, the other machine takes it and wakes its workers.
        assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
        until("the other machine indexes now", async || indexers(&mut conn).await == 1).await;
        let next = other.wait("b-gpu0", &shutdown);
        until("the worker is parked", async || parked(&mut conn).await == 1).await;
        let submitted = Instant::now();
        let id = api.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        assert_eq!(next.await.unwrap().unwrap().id, id);
        assert!(submitted.elapsed() < Duration::from_secs(1));
        shutdown.cancel();
        other.events.await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_redis_restart_submissions_still_wake_a_worker() {
    within(LIMIT, async {
        let mut server = RedisServer::start();
        let shutdown = CancellationToken::new();
        let m = Machine::start(&server, "m", &shutdown).await;
        let mut conn = raw(&server).await;
        until("the machine indexes", async || indexers(&mut conn).await == 1).await;
        let first = m.wait("m-gpu0", &shutdown);
        until("the worker is parked", async || parked(&mut conn).await == 1).await;
        server.stop_keeping_data();
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.start_again();
        let mut conn = raw(&server).await;
        until("the machine indexes again", async || indexers(&mut conn).await == 1).await;
        until("the worker is parked again", async || parked(&mut conn).await == 1).await;
        let submitted = Instant::now();
        let id = m.broker.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        assert_eq!(first.await.unwrap().unwrap().id, id);
        assert!(
            submitted.elapsed() < Duration::from_secs(2),
            "claimed {:?} after submission",
            submitted.elapsed()
        );
        shutdown.cancel();
        m.events.await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_submitted_while_every_worker_is_busy_goes_to_the_first_that_frees_up_in_order() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let shutdown = CancellationToken::new();
        let m1 = Machine::start(&server, "m1", &shutdown).await;
        let m2 = Machine::start(&server, "m2", &shutdown).await;
        let api = &m1.broker;
        api.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        api.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let busy1 = m1.wait("m1-gpu0", &shutdown).await.unwrap().unwrap();
        let busy2 = m2.wait("m2-gpu0", &shutdown).await.unwrap().unwrap();
        let older = api.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let newer = api.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        // Nobody waits: the submissions wake no one and stay queued.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut conn = raw(&server).await;
        let pending: usize = redis::cmd("ZCARD")
            .arg("jobs:pending")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(pending, 2);
        // The second machine's worker frees up first: it takes the older job at once.
        m2.broker.complete(&busy2, &json!({})).await.unwrap();
        let freed = Instant::now();
        let next2 = m2.wait("m2-gpu0", &shutdown).await.unwrap().unwrap();
        assert_eq!(next2.id, older);
        assert!(freed.elapsed() < Duration::from_secs(1));
        m1.broker.complete(&busy1, &json!({})).await.unwrap();
        let next1 = m1.wait("m1-gpu0", &shutdown).await.unwrap().unwrap();
        assert_eq!(next1.id, newer);
        shutdown.cancel();
        m1.events.await.unwrap();
        m2.events.await.unwrap();
    })
    .await;
}

/// A real `machine run` with one simulation worker.
struct RealMachine {
    child: crate::support::KillOnDrop,
    id: String,
    _dir: tempfile::TempDir,
}

impl RealMachine {
    fn start(redis_url: &str, id: &str) -> RealMachine {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("machine.toml");
        std::fs::write(&config, "[connectors.simulation]\nduration = \"200ms\"\nsteps = 2\n").unwrap();
        let log = std::fs::File::create(dir.path().join("machine.log")).unwrap();
        let child = crate::support::machine()
            .arg("run")
            .env("MACHINE_CONFIG", &config)
            .env("MACHINE_ID", id)
            .env("MACHINE_WORKSPACE", dir.path().join("ws"))
            .env("MACHINE_HEALTH_PORT", testkit::free_port().to_string())
            .env("HUB_REDIS_URL", redis_url)
            .env("WORKER_CONNECTORS", "simulation:1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the machine binary starts");
        RealMachine {
            child: child.into(),
            id: id.to_owned(),
            _dir: dir,
        }
    }

    fn kill(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let _ = self.child.wait();
    }
}

/// Real machines: the fleet's indexer is SIGKILLed, and another machine right after its worker
/// parked (so it may be the one a submission wakes); every job submitted then runs once, on the
/// machine left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_machines_sigkilled_as_the_indexer_or_the_woken_one_lose_no_job() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let mut machines: Vec<RealMachine> = (0..3)
            .map(|i| RealMachine::start(&server.url(), &format!("rk{i}")))
            .collect();
        let mut conn = raw(&server).await;
        until_within(
            Duration::from_secs(60),
            "every machine's worker is parked",
            async || parked(&mut conn).await == 3,
        )
        .await;
        // The lease holder's name is `<pid>-<random>`.
        let holder: String = redis::cmd("GET")
            .arg("jobs:idx:indexer")
            .query_async(&mut conn)
            .await
            .unwrap();
        let pid = holder.split('-').next().unwrap().to_owned();
        let at = machines
            .iter()
            .position(|m| m.child.id().to_string() == pid)
            .expect("the indexer is one of the machines");
        machines.remove(at).kill();
        machines.remove(0).kill();
        let survivor = machines.pop().unwrap();
        let url = RedisUrl::parse(&server.url()).unwrap();
        let api = Broker::connect(&url, BrokerOptions::default()).await.unwrap();
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(api.submit(&NewJob::new("simulation", json!({}))).await.unwrap());
        }
        for id in &ids {
            until_within(Duration::from_secs(30), "every job completes", async || {
                let view = api.show(id).await.unwrap().unwrap();
                view.job.state() == machine::broker::JobState::Completed
            })
            .await;
            let job = api.show(id).await.unwrap().unwrap().job.stored().clone();
            assert_eq!(job["retry_count"], "0", "claimed once: {job:?}");
            assert!(job["worker_id"].starts_with(&survivor.id), "{job:?}");
        }
        // The machine left is the indexer now, and a submission reaches its worker at once.
        until("the survivor indexes", async || indexers(&mut conn).await == 1).await;
        until("its worker is parked", async || parked(&mut conn).await >= 1).await;
        let submitted = Instant::now();
        let id = api.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        until_within(Duration::from_secs(10), "the last job completes", async || {
            api.show(&id).await.unwrap().unwrap().job.state() == machine::broker::JobState::Completed
        })
        .await;
        assert!(
            submitted.elapsed() < Duration::from_secs(3),
            "{:?}",
            submitted.elapsed()
        );
        drop(survivor);
    })
    .await;
}

/// A job back in the queue (here a graceful return) wakes one parked worker that can run it,
/// as a submission does, not every waiting worker of the fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_job_wakes_one_parked_worker_not_all() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let shutdown = CancellationToken::new();
        let mut machines = Vec::new();
        for i in 0..5 {
            machines.push(Machine::start(&server, &format!("m{i}"), &shutdown).await);
        }
        let mut conn = raw(&server).await;
        until("one machine indexes for the fleet", async || {
            indexers(&mut conn).await == 1
        })
        .await;
        let api = &machines[0].broker;
        let id = api.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let runner = Capabilities::new("runner-gpu0", "runner", &["simulation"]);
        let job = api.claim(&runner).await.unwrap().expect("the job is claimed");
        assert_eq!(job.id, id);
        let waiters: Vec<_> = machines
            .iter()
            .map(|m| m.wait(&format!("{}-gpu0", m.id), &shutdown))
            .collect();
        until("every worker is parked", async || parked(&mut conn).await == 5).await;
        let monitor = Monitor::start(&server);
        tokio::time::sleep(Duration::from_millis(200)).await;
        api.return_job(&job).await.unwrap();
        until_within(
            Duration::from_secs(2),
            "a parked worker claims the returned job",
            async || waiters.iter().any(JoinHandle::is_finished),
        )
        .await;
        // Anything the fleet would still do for this return happens within this.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            monitor.calls(&["findMatchingJob", "claimOrPark"]),
            1,
            "one woken worker claims; the other four sleep on"
        );
        shutdown.cancel();
        let mut got = Vec::new();
        for w in waiters {
            got.extend(w.await.unwrap());
        }
        assert_eq!(got.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), vec![id]);
        for m in machines {
            m.events.await.unwrap();
        }
    })
    .await;
}

/// A parked worker that stops claiming (held, quarantined, draining, waiting for its services:
/// the worker calls `Broker::leave_park`, test `workers::a_held_worker_leaves_the_fleets_park_...`)
/// is out of the park at once: the next submission wakes a worker that claims, not one that
/// would not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_left_the_park_is_not_woken() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let shutdown = CancellationToken::new();
        let a = Machine::start(&server, "a", &shutdown).await;
        let b = Machine::start(&server, "b", &shutdown).await;
        let mut conn = raw(&server).await;
        until("one machine indexes", async || indexers(&mut conn).await == 1).await;
        let waiting = b.wait("b-gpu0", &shutdown);
        until("b's worker is parked", async || parked(&mut conn).await == 1).await;
        // a's worker parks last: a submission would wake it first.
        let stop_a = shutdown.child_token();
        let stopping = a.wait("a-gpu0", &stop_a);
        until("a's worker is parked", async || parked(&mut conn).await == 2).await;
        stop_a.cancel();
        assert!(stopping.await.unwrap().is_none());
        a.broker.leave_park("a-gpu0").await;
        assert_eq!(parked(&mut conn).await, 1, "a's worker left the park");
        let mut wakes = subscribed(&server.url(), "jobs:wake:a").await;
        let submitted = Instant::now();
        let id = a.broker.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let job = waiting.await.unwrap().expect("b's worker takes the job");
        assert_eq!(job.id, id);
        assert!(
            submitted.elapsed() < Duration::from_millis(700),
            "woken at once, not after the wake deadline: {:?}",
            submitted.elapsed()
        );
        let mut msgs = wakes.on_message();
        let woke_a = tokio::time::timeout(Duration::from_millis(300), futures_util::StreamExt::next(&mut msgs)).await;
        assert!(woke_a.is_err(), "the stopped worker was woken: {woke_a:?}");
        shutdown.cancel();
        a.events.await.unwrap();
        b.events.await.unwrap();
    })
    .await;
}

/// One wake looks at a bounded number of parked workers (the most recently parked first): a
/// job that only the twentieth of twenty parked workers can run is still claimed within 2 s,
/// the wakes after the first looking further into the park.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_only_the_twentieth_parked_worker_can_run_is_claimed_within_two_seconds() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let shutdown = CancellationToken::new();
        let m = Machine::start(&server, "m", &shutdown).await;
        let mut conn = raw(&server).await;
        until("the machine indexes", async || indexers(&mut conn).await == 1).await;
        let mut rare = Capabilities::new("m-gpu0", "m", &["simulation"]);
        rare.models.insert("simulation".to_owned(), vec!["rare".to_owned()]);
        let capable = m.wait_as(rare, &shutdown);
        until("the capable worker is parked", async || parked(&mut conn).await == 1).await;
        // Parked after it, so looked at before it.
        let others: Vec<_> = (1..20).map(|i| m.wait(&format!("m-gpu{i}"), &shutdown)).collect();
        until("twenty workers are parked", async || parked(&mut conn).await == 20).await;
        let mut job = NewJob::new("simulation", json!({}));
        job.requirements = json!({"models": ["rare"]}).to_string();
        let submitted = Instant::now();
        let id = m.broker.submit(&job).await.unwrap();
        let claimed = capable.await.unwrap().expect("the capable worker takes the job");
        assert_eq!(claimed.id, id);
        assert!(
            submitted.elapsed() < Duration::from_secs(2),
            "claimed {:?} after submission",
            submitted.elapsed()
        );
        shutdown.cancel();
        for w in others {
            assert!(w.await.unwrap().is_none());
        }
        m.events.await.unwrap();
    })
    .await;
}

/// A worker whose machine died without leaving the park (SIGKILLed between two safety polls)
/// drops out of `jobs:idx:parked` once its park runs out: the fleet's sweeper looks over the
/// park a bounded number of entries per step and removes the parks that ran out, so the hash
/// does not grow with every machine that ever died. A live worker's park stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_park_is_removed_once_it_ran_out() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let shutdown = CancellationToken::new();
        let m = Machine::start(&server, "alive", &shutdown).await;
        let waiter = m.wait("alive-gpu0", &shutdown);
        let mut conn = raw(&server).await;
        until("the live worker is parked", async || parked(&mut conn).await == 1).await;
        // The dead machine's worker parked for 300 ms and never polled or left again.
        park_a_dead_machines_worker(&mut conn, 300).await;
        assert_eq!(parked(&mut conn).await, 2);
        // The sweeper steps every 2 s; a few steps are enough.
        until_within(
            Duration::from_secs(10),
            "the dead worker's park is removed",
            async || {
                let gone: bool = redis::cmd("HEXISTS")
                    .arg("jobs:idx:parked")
                    .arg("gone-gpu0")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                !gone
            },
        )
        .await;
        let idle: Option<f64> = redis::cmd("ZSCORE")
            .arg("jobs:idx:idle:simulation")
            .arg("gone-gpu0")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(idle, None, "nor is it in its service's idle set");
        let alive: bool = redis::cmd("HEXISTS")
            .arg("jobs:idx:parked")
            .arg("alive-gpu0")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(alive, "the live worker stays parked");
        shutdown.cancel();
        assert!(waiter.await.unwrap().is_none());
        m.events.await.unwrap();
    })
    .await;
}

/// Parks the worker `gone-gpu0` of a machine that is never heard again (SIGKILLed right after
/// it parked) for `park_ms`, as its `claimOrPark` would, on an empty queue.
async fn park_a_dead_machines_worker(conn: &mut redis::aio::MultiplexedConnection, park_ms: u64) {
    let ghost = Capabilities::new("gone-gpu0", "gone", &["simulation"]);
    let none: Option<String> = redis::cmd("FCALL")
        .arg("claimOrPark")
        .arg(0)
        .arg(ghost.to_json())
        .arg(100)
        .arg(60_000)
        .arg("")
        .arg(park_ms)
        .query_async(conn)
        .await
        .unwrap();
    assert!(none.is_none(), "nothing to claim: the worker parks");
}
