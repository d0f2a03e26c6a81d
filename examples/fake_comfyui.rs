//! A fake ComfyUI server for the end-to-end tests (`machine run` supervises it as the ComfyUI
//! service): `fake_comfyui --port N [--models DIR]`. It speaks ComfyUI's HTTP and WebSocket API
//! through `testkit::FakeComfyui`; with `--models` (ComfyUI's `models/` folder), `/prompt`
//! refuses a loader input naming a file absent from it, as upstream does. Being an example,
//! `cargo test` builds it and the product never links it.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port = flag(&args, "--port")
        .map(|v| v.parse::<u16>().expect("--port takes a port number"))
        .unwrap_or(8188);
    let models = flag(&args, "--models").map(std::path::PathBuf::from);
    let fake = testkit::FakeComfyui::start_on_with_models(port, models.as_deref());
    println!("fake ComfyUI listening on {}", fake.url());
    fake.wait();
}

/// The value of `--name V` or `--name=V`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == name {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(name).and_then(|v| v.strip_prefix('='))
        }
    })
}
