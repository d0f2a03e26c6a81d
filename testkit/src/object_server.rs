//! Real object-store servers per test, on free loopback ports in their own temp dirs, killed on
//! drop: Azurite (Microsoft's Azure Storage emulator, npm `azurite`), moto's S3 server (PyPI
//! `moto[server]`, with IAM authentication switched on so a wrong key is refused) and
//! `gcp-storage-emulator` (PyPI). scripts/test-deps.sh installs all three.
//!
//! Each server hands out the standard environment variables a client needs ([`ObjectServer::env`])
//! and is inspected through a client that is not the machine's: the providers' official SDKs
//! (`testkit/scripts/store_client.py`), so what a test reads back is what any client would see.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Azurite's well-known development account and key (public, documented by Microsoft).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// The key of [`AZURITE_ACCOUNT`].
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Which protocol a server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// Azure Blob Storage (Azurite).
    Azure,
    /// Amazon S3 (moto).
    S3,
    /// Google Cloud Storage (gcp-storage-emulator).
    Gcs,
}

impl StoreKind {
    /// The `provider` a job's `ctx` names for this kind.
    pub fn provider(self) -> &'static str {
        match self {
            StoreKind::Azure => "azure",
            StoreKind::S3 => "s3",
            StoreKind::Gcs => "gcs",
        }
    }
}

/// One object as the independent client lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    /// Its key.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its stored content type.
    pub content_type: Option<String>,
}

/// A running object-store server owned by one test.
#[derive(Debug)]
pub struct ObjectServer {
    kind: StoreKind,
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// S3 only: the IAM key created at start.
    s3_key: Option<(String, String)>,
}

impl ObjectServer {
    /// Starts a server of `kind`; panics with the reason when it cannot (the test script
    /// installs every server, so a missing one is a broken set-up, not a reason to skip).
    pub fn start(kind: StoreKind) -> ObjectServer {
        let dir = tempfile::Builder::new()
            .prefix("machine-objects-")
            .tempdir()
            .expect("creating a temp dir");
        for _ in 0..3 {
            let port = crate::free_port();
            let mut child = spawn(kind, port, &dir);
            if wait_for_port(port, &mut child, Duration::from_secs(30)) {
                let mut server = ObjectServer {
                    kind,
                    child: Some(child),
                    port,
                    dir,
                    s3_key: None,
                };
                if kind == StoreKind::S3 {
                    let v = server.client(&["setup"]);
                    server.s3_key = Some((
                        v["key_id"].as_str().expect("setup prints key_id").to_owned(),
                        v["secret"].as_str().expect("setup prints secret").to_owned(),
                    ));
                }
                return server;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "the {kind:?} server did not come up; see {}",
            dir.path().join("server.log").display()
        );
    }

    /// Its kind.
    pub fn kind(&self) -> StoreKind {
        self.kind
    }

    /// The server's base URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The standard environment variables that point a client at this server with valid
    /// credentials.
    pub fn env(&self) -> Vec<(String, String)> {
        let v = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        match self.kind {
            StoreKind::Azure => v(&[
                ("AZURE_STORAGE_ACCOUNT_NAME", AZURITE_ACCOUNT),
                ("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY),
                (
                    "AZURE_STORAGE_ENDPOINT",
                    &format!("{}/{AZURITE_ACCOUNT}", self.endpoint()),
                ),
                ("AZURE_ALLOW_HTTP", "true"),
            ]),
            StoreKind::S3 => {
                let (id, secret) = self.s3_key.clone().expect("the S3 key is made at start");
                v(&[
                    ("AWS_ACCESS_KEY_ID", &id),
                    ("AWS_SECRET_ACCESS_KEY", &secret),
                    ("AWS_REGION", "us-east-1"),
                    ("AWS_ENDPOINT", &self.endpoint()),
                    ("AWS_ALLOW_HTTP", "true"),
                    ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false"),
                ])
            }
            StoreKind::Gcs => {
                let key = serde_json::json!({
                    "gcs_base_url": self.endpoint(),
                    "disable_oauth": true,
                    "client_email": "",
                    "private_key": "",
                    "private_key_id": ""
                });
                v(&[("GOOGLE_SERVICE_ACCOUNT_KEY", &key.to_string())])
            }
        }
    }

    /// [`ObjectServer::env`] with a wrong secret key (`None` for servers that check no
    /// credentials: the GCS emulator accepts anything).
    pub fn env_with_wrong_key(&self) -> Option<Vec<(String, String)>> {
        let wrong_key = match self.kind {
            StoreKind::Azure => (
                "AZURE_STORAGE_ACCOUNT_KEY",
                "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmcta2V5LXdyb25nLWtleQ==",
            ),
            StoreKind::S3 => ("AWS_SECRET_ACCESS_KEY", "wrong/secret/wrong/secret/wrong/secret/xx"),
            StoreKind::Gcs => return None,
        };
        Some(
            self.env()
                .into_iter()
                .map(|(k, v)| {
                    if k == wrong_key.0 {
                        (k, wrong_key.1.to_owned())
                    } else {
                        (k, v)
                    }
                })
                .collect(),
        )
    }

    /// Creates a bucket (an Azure container) through the independent client.
    pub fn create_bucket(&self, bucket: &str) {
        self.client(&["create", bucket]);
    }

    /// Every object of `bucket`, through the independent client.
    pub fn list(&self, bucket: &str) -> Vec<ListedObject> {
        let v = self.client(&["list", bucket]);
        let mut out: Vec<ListedObject> = v
            .as_array()
            .expect("list prints an array")
            .iter()
            .map(|o| ListedObject {
                name: o["name"].as_str().expect("a name").to_owned(),
                size: o["size"].as_u64().expect("a size"),
                content_type: o["content_type"].as_str().map(str::to_owned),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Downloads one object through the independent client: its bytes and content type.
    pub fn get(&self, bucket: &str, key: &str) -> (Vec<u8>, Option<String>) {
        let file = self.dir.path().join("download");
        let path = file.to_str().expect("temp paths are UTF-8");
        let v = self.client(&["get", bucket, key, path]);
        let bytes = std::fs::read(&file).expect("the client wrote the download");
        (bytes, v["content_type"].as_str().map(str::to_owned))
    }

    /// Benchmark baseline: the provider's own SDK uploads `file` `count` times, `parallel` at a
    /// time, `rounds` times over; the wall time of each round, measured inside the client.
    pub fn sdk_put_many(
        &self,
        bucket: &str,
        prefix: &str,
        file: &std::path::Path,
        count: usize,
        parallel: usize,
        rounds: usize,
    ) -> Vec<Duration> {
        let file = file.to_str().expect("temp paths are UTF-8");
        let v = self.client(&[
            "put-many",
            bucket,
            prefix,
            file,
            &count.to_string(),
            &parallel.to_string(),
            &rounds.to_string(),
        ]);
        v["seconds"]
            .as_array()
            .expect("put-many prints seconds")
            .iter()
            .map(|s| Duration::from_secs_f64(s.as_f64().expect("a number")))
            .collect()
    }

    /// An outage in the middle of whatever the server is doing: Azurite and the GCS emulator are
    /// killed (they keep their data on disk); moto, which keeps everything in memory, is stopped
    /// with SIGSTOP, so requests in flight hang and new ones get no answer. Undone by
    /// [`ObjectServer::restore`].
    pub fn interrupt(&mut self) {
        match self.kind {
            StoreKind::S3 => self.signal("-STOP"),
            StoreKind::Azure | StoreKind::Gcs => self.stop(),
        }
    }

    /// Ends an [`ObjectServer::interrupt`].
    pub fn restore(&mut self) {
        match self.kind {
            StoreKind::S3 => self.signal("-CONT"),
            StoreKind::Azure | StoreKind::Gcs => self.start_again(),
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("the server is running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid} failed");
    }

    /// Stops the server (an outage); its port stays closed until [`ObjectServer::start_again`].
    /// Azurite and the GCS emulator keep their data on disk; moto's S3 server loses it. SIGTERM
    /// first: Azurite writes its container metadata to disk only every few seconds and on a
    /// clean stop, so a SIGKILL soon after `create_bucket` would lose the container itself.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and directory.
    pub fn start_again(&mut self) {
        let mut child = spawn(self.kind, self.port, &self.dir);
        assert!(
            wait_for_port(self.port, &mut child, Duration::from_secs(30)),
            "the {:?} server did not come back on port {}",
            self.kind,
            self.port
        );
        self.child = Some(child);
    }

    fn client(&self, args: &[&str]) -> serde_json::Value {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/store_client.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script).arg(self.kind.provider()).args(args);
        cmd.env("STORE_ENDPOINT", self.endpoint());
        if let Some((id, secret)) = &self.s3_key {
            cmd.env("STORE_KEY_ID", id).env("STORE_SECRET", secret);
        }
        let out = cmd.output().expect("python3 runs (scripts/test-deps.sh installs it)");
        assert!(
            out.status.success(),
            "store_client.py {} {args:?} failed: {}",
            self.kind.provider(),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("store_client.py prints JSON")
    }
}

fn spawn(kind: StoreKind, port: u16, dir: &tempfile::TempDir) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("server.log"))
        .expect("creating the server log");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("creating the data dir");
    let port_s = port.to_string();
    let mut cmd = match kind {
        StoreKind::Azure => {
            let mut c = Command::new("azurite-blob");
            c.args(["--blobHost", "127.0.0.1", "--blobPort", &port_s, "--location"])
                .arg(&data)
                .args(["--silent", "--skipApiVersionCheck", "--disableTelemetry"]);
            c
        }
        StoreKind::S3 => {
            let mut c = Command::new("python3");
            // Three unauthenticated calls let the harness make an IAM user and its key; every
            // request after that must be signed with it.
            c.args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port_s])
                .env("INITIAL_NO_AUTH_ACTION_COUNT", "3");
            c
        }
        StoreKind::Gcs => {
            let mut c = Command::new("gcp-storage-emulator");
            c.arg("-d")
                .arg(&data)
                .args(["start", "--host", "127.0.0.1", "--port", &port_s, "-q"]);
            c
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().expect("cloning a file handle"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the {kind:?} server: {e}; run scripts/test-deps.sh"))
}

fn wait_for_port(port: u16, child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

impl Drop for ObjectServer {
    fn drop(&mut self) {
        if self.kind == StoreKind::S3 && self.child.is_some() {
            // A stopped process still dies of SIGKILL; continuing it first is only tidier.
            self.signal("-CONT");
        }
        self.stop();
    }
}
