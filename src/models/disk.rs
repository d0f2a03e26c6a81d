//! The models on disk: the names a job may use for each weights file under a models folder,
//! read by the workers for the capabilities they advertise and by the [`super::ModelStore`]
//! for the models it need not fetch.

use std::collections::BTreeSet;
use std::path::Path;

/// File extensions of model weights.
const MODEL_EXTENSIONS: [&str; 10] = [
    "safetensors",
    "ckpt",
    "pt",
    "pth",
    "bin",
    "gguf",
    "onnx",
    "sft",
    "engine",
    "pkl",
];

/// How deep model folders are searched (subfolders of `checkpoints/`, ...).
const MAX_DEPTH: usize = 4;

/// The models under `dir`: for each weights file, its path relative to its model-type folder
/// (`sdxl/base.safetensors`, as ComfyUI names it), its file name, and its stem (`base`), so a
/// job may name a model either way. Sorted, without duplicates; empty when `dir` is missing.
pub fn scan_models(dir: &Path) -> Vec<String> {
    let mut names = BTreeSet::new();
    let Ok(types) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    for entry in types.flatten() {
        let path = entry.path();
        // `metadata` follows symlinks: installers link a shared models directory in.
        if path.metadata().is_ok_and(|m| m.is_dir()) {
            walk(&path, &path, 0, &mut names);
        } else {
            add(&path, dir, &mut names);
        }
    }
    names.into_iter().collect()
}

fn walk(root: &Path, dir: &Path, depth: usize, names: &mut BTreeSet<String>) {
    if depth > MAX_DEPTH {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        match path.metadata() {
            Ok(m) if m.is_dir() => walk(root, &path, depth + 1, names),
            Ok(m) if m.is_file() => add(&path, root, names),
            _ => {}
        }
    }
}

fn add(path: &Path, root: &Path, names: &mut BTreeSet<String>) {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
    if !MODEL_EXTENSIONS.iter().any(|m| ext.eq_ignore_ascii_case(m)) {
        return;
    }
    if let Ok(rel) = path.strip_prefix(root) {
        names.insert(rel.to_string_lossy().replace('\\', "/"));
    }
    if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
        names.insert(name.to_owned());
    }
    if let Some(stem) = path.file_stem().and_then(|n| n.to_str()) {
        names.insert(stem.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_come_from_files_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("ComfyUI/models");
        std::fs::create_dir_all(models.join("checkpoints/sdxl")).unwrap();
        std::fs::create_dir_all(models.join("loras")).unwrap();
        std::fs::write(models.join("checkpoints/sd15.safetensors"), b"x").unwrap();
        std::fs::write(models.join("checkpoints/sdxl/base.ckpt"), b"x").unwrap();
        std::fs::write(models.join("checkpoints/put_checkpoints_here"), b"").unwrap();
        std::fs::write(models.join("loras/detail.pt"), b"x").unwrap();
        let found = scan_models(&models);
        assert_eq!(
            found,
            [
                "base",
                "base.ckpt",
                "detail",
                "detail.pt",
                "sd15",
                "sd15.safetensors",
                "sdxl/base.ckpt"
            ]
        );
        assert!(scan_models(&dir.path().join("missing")).is_empty());
    }
}
