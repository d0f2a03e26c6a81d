//! The fake ComfyUI as a process, for tests that point a supervised service at it (the
//! end-to-end test runs it as the ComfyUI service command). Takes ComfyUI's own flags:
//! `--port N` (default 8188); `--listen`, `--cpu` and anything else are accepted and ignored.
//! Runs until it is killed.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut port: u16 = 8188;
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if let Some(v) = a.strip_prefix("--port=") {
            port = v
                .parse()
                .unwrap_or_else(|_| panic!("--port `{v}` is not a port number"));
        } else if a == "--port" {
            let v = args.get(i + 1).expect("--port needs a value");
            port = v
                .parse()
                .unwrap_or_else(|_| panic!("--port `{v}` is not a port number"));
            i += 1;
        }
        i += 1;
    }
    let fake = testkit::FakeComfyui::start_on(port);
    println!("fake ComfyUI listening on {}", fake.url());
    fake.wait();
}
