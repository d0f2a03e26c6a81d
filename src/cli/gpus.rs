//! `machine gpus`: the GPU and host probe, as text or JSON.

use std::path::Path;

use super::common::{load_config, print_json};
use super::exit::{CliError, Outcome};
use crate::gpu::Probe;

/// Prints the probe of the GPUs and the host.
pub(super) fn gpus(path: Option<&Path>, json: bool) -> Result<Outcome, CliError> {
    let config = load_config(path)?;
    let probe = Probe::run(
        &config.machine.gpu,
        &config.machine.visible_devices,
        &config.machine.workspace,
    );
    if json {
        print_json(&probe);
    } else {
        print!("{}", render_probe(&probe));
    }
    Ok(Outcome::Success)
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1024.0 * 1024.0 * 1024.0))
}

pub(super) fn render_probe(probe: &Probe) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let source = match &probe.source {
        crate::gpu::GpuSource::Nvml {
            driver_version,
            cuda_driver_version,
        } => format!(
            "NVML (driver {driver_version}, CUDA {})",
            cuda_driver_version.as_deref().unwrap_or("unknown")
        ),
        crate::gpu::GpuSource::Config => "MACHINE_GPU_* overrides".to_owned(),
        crate::gpu::GpuSource::None => "none".to_owned(),
    };
    let _ = writeln!(s, "GPUs: {} (source: {source})", probe.gpus.len());
    for g in &probe.gpus {
        let _ = writeln!(
            s,
            "  [{}] {:<28} {:>10} total {:>10} free  {}",
            g.index,
            g.name,
            gib(g.memory_total_bytes),
            gib(g.memory_free_bytes),
            g.uuid.as_deref().unwrap_or("-")
        );
    }
    let h = &probe.host;
    let _ = writeln!(
        s,
        "Host: {} CPU cores, {} RAM ({} available), workspace disk {} free",
        h.cpu_cores,
        gib(h.ram_total_bytes),
        gib(h.ram_available_bytes),
        h.disk_free_bytes.map_or_else(|| "unknown".to_owned(), gib)
    );
    for n in &probe.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}
