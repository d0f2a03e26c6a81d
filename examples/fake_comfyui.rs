//! A fake ComfyUI server for the end-to-end test (`machine run` supervises it as the ComfyUI
//! service): `fake_comfyui --port N`. It speaks ComfyUI's HTTP and WebSocket API through
//! `testkit::FakeComfyui`; being an example, `cargo test` builds it and the product never links it.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port = args
        .iter()
        .position(|a| a == "--port")
        .and_then(|i| args.get(i + 1))
        .or_else(|| args.iter().find_map(|a| a.strip_prefix("--port=").map(|_| a)))
        .map(|v| {
            v.trim_start_matches("--port=")
                .parse::<u16>()
                .expect("--port takes a port number")
        })
        .unwrap_or(8188);
    let fake = testkit::FakeComfyui::start_on(port);
    println!("fake ComfyUI listening on {}", fake.url());
    fake.wait();
}
