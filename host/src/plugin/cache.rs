//! The on-disk cache of compiled components.
//!
//! An artifact is stored as `<sha256 of the wasm>-<engine compatibility hash>.cwasm`, written
//! atomically (a temporary file, then a rename), and ends with a 32-byte seal: the SHA-256 of the
//! file's name and contents. Deserializing a compiled artifact runs its machine code, so the cache
//! only ever deserializes a file under a name it computed itself whose seal matches; anything else
//! in the directory is never read, and a file whose seal does not match is recompiled over.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

use super::PluginError;

const SEAL_LEN: usize = 32;

/// How the cache has served loads since the runtime started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Loads served by deserializing a cached artifact.
    pub hits: u64,
    /// Loads that compiled the component (and then wrote the artifact).
    pub compiles: u64,
    /// Cached artifacts refused because their seal did not match (then recompiled over).
    pub rejected: u64,
}

pub(crate) struct ArtifactCache {
    dir: PathBuf,
    /// The engine's compatibility hash, hex: artifacts of another wasmtime build or another
    /// configuration get other names, never a failed or unsound deserialization.
    engine_key: String,
    hits: AtomicU64,
    compiles: AtomicU64,
    rejected: AtomicU64,
    temp_counter: AtomicU64,
}

/// Feeds `Hash` output into SHA-256, for a stable digest of the engine's compatibility hash.
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        // Only `write` is used; the digest is read from the inner hasher.
        0
    }
}

impl ArtifactCache {
    /// Opens (creating, private to this user) the cache directory.
    pub fn open(dir: &Path, engine: &Engine) -> Result<ArtifactCache, PluginError> {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).map_err(|source| PluginError::Io { path: dir.to_path_buf(), source })?;
        let mut hasher = ShaHasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = hex::encode(&hasher.0.finalize()[..8]);
        Ok(ArtifactCache {
            dir: dir.to_path_buf(),
            engine_key,
            hits: AtomicU64::new(0),
            compiles: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            temp_counter: AtomicU64::new(0),
        })
    }

    /// The counters so far.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            compiles: self.compiles.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }

    /// Where the artifact of `wasm` lives for this engine.
    pub fn path_for(&self, wasm: &[u8]) -> PathBuf {
        let key = hex::encode(Sha256::digest(wasm));
        self.dir.join(format!("{key}-{}.cwasm", self.engine_key))
    }

    /// The component for `wasm`, from the cache when a sealed artifact is there, else compiled
    /// (and cached; a cache that cannot be written only costs the next load a compile).
    pub fn load(&self, engine: &Engine, wasm: &[u8]) -> Result<Component, PluginError> {
        let path = self.path_for(wasm);
        match fs::read(&path) {
            Ok(file) => match unseal(&path, &file) {
                Some(artifact) => {
                    // SAFETY: `Component::deserialize` trusts its input to be an artifact that
                    // wasmtime produced for this engine. These bytes are: the file has the name
                    // this cache computes from the wasm's hash and the engine's compatibility
                    // hash, and its seal proves it is the exact file `store` below wrote (the
                    // directory is private to this user; a file put there by anyone else, or
                    // damaged, fails the seal and is compiled over, never deserialized).
                    let component = unsafe { Component::deserialize(engine, artifact) };
                    match component {
                        Ok(component) => {
                            self.hits.fetch_add(1, Ordering::Relaxed);
                            return Ok(component);
                        }
                        Err(error) => {
                            tracing::warn!(path = %path.display(), %error, "cached plugin artifact refused; recompiling");
                        }
                    }
                }
                None => {
                    self.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(path = %path.display(), "cached plugin artifact has a bad seal; recompiling");
                }
            },
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => tracing::warn!(path = %path.display(), %error, "cannot read cached plugin artifact"),
        }
        let artifact = engine.precompile_component(wasm).map_err(|e| PluginError::Compile(format!("{e:#}")))?;
        self.compiles.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = self.store(&path, &artifact) {
            tracing::warn!(path = %path.display(), %error, "cannot write plugin artifact to the cache");
        }
        // SAFETY: `artifact` is what `precompile_component` of this very engine just returned.
        unsafe { Component::deserialize(engine, &artifact) }.map_err(|e| PluginError::Compile(format!("{e:#}")))
    }

    /// Writes `artifact` and its seal to a temporary file, then renames it into place, so that a
    /// reader sees either no file or the whole file.
    fn store(&self, path: &Path, artifact: &[u8]) -> std::io::Result<()> {
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let temp = self.dir.join(format!(".tmp-{}-{n}", std::process::id()));
        let result = (|| {
            let mut file = fs::File::create(&temp)?;
            file.write_all(artifact)?;
            file.write_all(&seal(path, artifact))?;
            file.sync_all()?;
            fs::rename(&temp, path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }
}

/// The seal of an artifact stored at `path`: binds the contents to the file's name.
fn seal(path: &Path, artifact: &[u8]) -> [u8; SEAL_LEN] {
    let name = path.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default();
    let mut hasher = Sha256::new();
    hasher.update((name.len() as u64).to_le_bytes());
    hasher.update(name);
    hasher.update(artifact);
    hasher.finalize().into()
}

/// The artifact inside a cache file, if its seal matches.
fn unseal<'a>(path: &Path, file: &'a [u8]) -> Option<&'a [u8]> {
    let split = file.len().checked_sub(SEAL_LEN)?;
    let (artifact, found) = file.split_at(split);
    (seal(path, artifact) == found).then_some(artifact)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{seal, unseal};

    #[test]
    fn the_seal_binds_contents_and_name() {
        let path = Path::new("/c/abc-123.cwasm");
        let mut file = b"artifact".to_vec();
        file.extend_from_slice(&seal(path, b"artifact"));
        assert_eq!(unseal(path, &file), Some(&b"artifact"[..]));
        assert_eq!(unseal(Path::new("/c/other-123.cwasm"), &file), None);
        file[0] ^= 1;
        assert_eq!(unseal(path, &file), None);
        assert_eq!(unseal(path, b"short"), None);
    }
}
