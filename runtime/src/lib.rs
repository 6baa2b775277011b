//! Weir's streaming engine. The engine itself (key groups, RocksDB state, exchange,
//! operators, checkpoints) is being built; today this crate reads and checks job manifests.

use std::path::Path;

use weir_crds::StreamJob;

/// Reads a StreamJob manifest (the same file `kubectl apply` takes) and checks its spec.
pub fn load_manifest(path: &Path) -> anyhow::Result<StreamJob> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let job: StreamJob = serde_saphyr::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not a valid StreamJob manifest: {e}", path.display()))?;
    job.spec.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(job)
}
