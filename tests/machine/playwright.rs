//! The Playwright render service end to end: `machine install --only playwright` installs
//! pinned playwright-core and p5 from the npm registry next to the shipped server, which then
//! drives the system Chromium (Debian's `chromium`; scripts/test-deps.sh installs it). The
//! connector renders a p5 sketch, an HTML page and a URL; the PNGs are decoded and their size
//! and pixels checked. The browser is killed once and must come back for the next job.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use machine::config::ConnectorKind;
use machine::connectors::playwright::PlaywrightConnector;
use machine::connectors::{ArtifactBody, Connector, ConnectorError, ErrorClass, ProgressSink};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::installers::{machine, text};
use crate::support::job;

/// The render server child; killed (with its browser) when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.0.wait();
    }
}

/// A decoded PNG: width, height, samples per pixel, 8-bit samples.
type Image = (u32, u32, usize, Vec<u8>);

async fn render(c: &PlaywrightConnector, service: &str, payload: Value) -> Result<Image, ConnectorError> {
    let (sink, rx) = ProgressSink::new();
    let out = c.run(&job(service, payload), &sink, &CancellationToken::new()).await?;
    assert_eq!(rx.borrow().1.percent, 100.0);
    let a = &out.artifacts[0];
    assert_eq!(a.content_type, "image/png");
    let ArtifactBody::Bytes(b) = &a.body else {
        panic!("a rendered PNG is bytes")
    };
    assert_eq!(out.data["bytes"], b.len());
    let mut reader = png::Decoder::new(std::io::Cursor::new(b.to_vec()))
        .read_info()
        .expect("the render is a valid PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("the image size fits in memory")];
    let info = reader.next_frame(&mut buf).expect("the PNG decodes");
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    buf.truncate(info.buffer_size());
    Ok((info.width, info.height, info.color_type.samples(), buf))
}

fn rgb(img: &Image, x: u32, y: u32) -> [u8; 3] {
    let (w, _, ch, data) = img;
    let i = ((y * w + x) as usize) * ch;
    [data[i], data[i + 1], data[i + 2]]
}

fn near(a: [u8; 3], b: [u8; 3]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.abs_diff(y) <= 12)
}

#[test]
fn renders_p5_html_and_urls_through_the_connector() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path().join("ws");
    let env = vec![
        ("MACHINE_WORKSPACE", ws.display().to_string()),
        ("WORKER_CONNECTORS", "playwright".to_owned()),
    ];
    let out = machine(&["install"], &env, Duration::from_secs(400));
    assert!(out.status.success(), "{}", text(&out));
    assert!(ws.join("playwright/node_modules/p5/lib/p5.min.js").exists());

    let started = Instant::now();
    let again = machine(&["install"], &env, Duration::from_secs(60));
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("up to date"),
        "{}",
        text(&again)
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no-op install took {:?}",
        started.elapsed()
    );

    let port = testkit::free_port();
    let launch =
        machine::installers::launch(ConnectorKind::Playwright, &ws, port, None).expect("playwright runs a service");
    let mut cmd = Command::new(&launch.command[0]);
    cmd.args(&launch.command[1..])
        .current_dir(&launch.cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut server = Server(cmd.spawn().expect("node runs"));

    let pages = testkit::FileServer::start();
    pages.add(
        "/page.html",
        b"<html><body style='margin:0;background:rgb(255,255,0)'><div style='width:20px;height:20px;background:rgb(255,0,255)'></div></body></html>".to_vec(),
        "text/html",
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(180), async {
            let base = format!("http://127.0.0.1:{port}");
            let client = reqwest::Client::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(r) = client.get(format!("{base}/health")).send().await {
                    if r.status().is_success() {
                        break;
                    }
                }
                if let Ok(Some(status)) = server.0.try_wait() {
                    let mut err = String::new();
                    let _ = server.0.stderr.take().unwrap().read_to_string(&mut err);
                    panic!("the render server exited with {status}: {err}");
                }
                assert!(Instant::now() < deadline, "the render service never became healthy");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let c = PlaywrightConnector::new(base.parse().unwrap());

            let sketch = "function setup() { createCanvas(200, 100); noStroke(); background(255, 0, 0);\n\
                          fill(0, 0, 255); rect(100, 0, 100, 100); noLoop(); }";
            let img = render(&c, "p5", json!({"code": sketch, "width": 200, "height": 100})).await.unwrap();
            assert_eq!((img.0, img.1), (200, 100));
            assert!(near(rgb(&img, 50, 50), [255, 0, 0]), "{:?}", rgb(&img, 50, 50));
            assert!(near(rgb(&img, 150, 50), [0, 0, 255]), "{:?}", rgb(&img, 150, 50));

            let instance = "new p5((p) => { p.setup = () => { p.createCanvas(80, 40); p.background(0, 255, 0); p.noLoop(); }; });";
            let img = render(&c, "playwright", json!({"kind": "p5", "code": instance, "width": 80, "height": 40}))
                .await
                .unwrap();
            assert_eq!((img.0, img.1), (80, 40));
            assert!(near(rgb(&img, 40, 20), [0, 255, 0]), "{:?}", rgb(&img, 40, 20));

            let html = "<html><body style='margin:0;background:#00ff00'>\
                        <div style='position:absolute;left:0;top:0;width:60px;height:80px;background:#0000ff'></div></body></html>";
            let payload = json!({"html": html, "width": 120, "height": 80, "device_scale": 2});
            let img = render(&c, "html_render", payload).await.unwrap();
            assert_eq!((img.0, img.1), (240, 160));
            assert!(near(rgb(&img, 20, 20), [0, 0, 255]), "{:?}", rgb(&img, 20, 20));
            assert!(near(rgb(&img, 200, 100), [0, 255, 0]), "{:?}", rgb(&img, 200, 100));

            let payload = json!({"kind": "url", "url": pages.url("/page.html"), "width": 64, "height": 48, "wait_ms": 50});
            let img = render(&c, "playwright", payload).await.unwrap();
            assert_eq!((img.0, img.1), (64, 48));
            assert!(near(rgb(&img, 5, 5), [255, 0, 255]), "{:?}", rgb(&img, 5, 5));
            assert!(near(rgb(&img, 40, 30), [255, 255, 0]), "{:?}", rgb(&img, 40, 30));

            // A sketch that throws fails the job without retry, and the service keeps working.
            let e = render(&c, "p5", json!({"code": "function setup() { undefinedThing(); }"})).await.unwrap_err();
            assert_eq!(e.class(), ErrorClass::Fatal, "{}", e.chain());
            assert!(e.chain().contains("undefinedThing"), "{}", e.chain());
            let e = render(&c, "html_render", json!({"html": "<p>x</p>", "width": 0})).await.unwrap_err();
            assert_eq!(e.class(), ErrorClass::Fatal, "{}", e.chain());

            // Cancellation returns at once (the request is dropped; the service closes the page).
            let cancel = CancellationToken::new();
            let slow = job("html_render", json!({"html": "<p>slow</p>", "wait_ms": 20000}));
            let (sink, _rx) = ProgressSink::new();
            let stop = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                stop.cancel();
            });
            let started = Instant::now();
            let r = c.run(&slow, &sink, &cancel).await;
            assert!(matches!(r, Err(ConnectorError::Cancelled)), "{r:?}");
            assert!(started.elapsed() < Duration::from_secs(3));
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let health: Value = client.get(format!("{base}/health")).send().await.unwrap().json().await.unwrap();
                if health["active"] == 0 {
                    break;
                }
                assert!(Instant::now() < deadline, "the cancelled render still holds its slot: {health}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }

            // The browser dies; the next job relaunches it.
            let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", server.0.id())).unwrap();
            let browsers: Vec<i32> = children.split_whitespace().filter_map(|p| p.parse().ok()).collect();
            assert!(!browsers.is_empty(), "the server has a browser child");
            for pid in browsers {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            let img = render(&c, "p5", json!({"code": sketch, "width": 200, "height": 100})).await.unwrap();
            assert!(near(rgb(&img, 150, 50), [0, 0, 255]));
        })
        .await
        .expect("the render checks finish within 3 minutes");
    });
}
