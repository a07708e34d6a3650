//! The on-disk cache of compiled components.
//!
//! An artifact is stored as `<sha256 of the wasm>-<engine compatibility hash>.cwasm`, written
//! atomically (a temporary file, then a rename), and ends with a 32-byte seal: the HMAC-SHA256,
//! under the cache's own secret key, of the file's name and contents. Deserializing a compiled
//! artifact runs its machine code, so the cache only ever deserializes a file under a name it
//! computed itself whose seal matches; anything else in the directory is never read, and a file
//! whose seal does not match is recompiled over. Nobody without the key (which only this user
//! can read) can make a seal, so a planted file is never run.
//!
//! The directory and the key must be this user's alone: the cache refuses (typed, as
//! [`PluginError::InsecureCache`]) a directory or key that is a symlink, owned by another user,
//! or writable by group or others (the key: readable by them either). Files are opened without
//! following symlinks. The key is `.seal-key` inside the directory, created with mode 0600 on
//! first use (inside rather than beside it, so that a cache under a shared folder such as `/tmp`
//! leaves nothing in that folder). The default directory is per user ([`default_dir`]).

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
#[cfg(unix)]
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

use super::PluginError;

const SEAL_LEN: usize = 32;
/// Bytes of the seal key.
const KEY_LEN: usize = 32;
/// The seal key's file name, inside the cache directory.
const KEY_FILE: &str = ".seal-key";

/// The per-user default cache directory: `$XDG_CACHE_HOME/meridian/plugins`, else
/// `$HOME/.cache/meridian/plugins`, else (no home) `.meridian/plugin-cache` under the working
/// directory. Never a shared folder such as `/tmp`, where another user could make it first.
pub fn default_dir() -> PathBuf {
    dir_under(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"))
}

/// [`default_dir`] for these values of `XDG_CACHE_HOME` and `HOME` (relative ones are ignored, as
/// the XDG specification says).
fn dir_under(xdg_cache_home: Option<std::ffi::OsString>, home: Option<std::ffi::OsString>) -> PathBuf {
    let absolute = |var: Option<std::ffi::OsString>| var.map(PathBuf::from).filter(|p| p.is_absolute());
    absolute(xdg_cache_home)
        .or_else(|| absolute(home).map(|home| home.join(".cache")))
        .map_or_else(|| PathBuf::from(".meridian/plugin-cache"), |cache| cache.join("meridian").join("plugins"))
}

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
    /// The seal's HMAC key.
    key: [u8; KEY_LEN],
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
    /// Opens (creating, private to this user) the cache directory and its seal key; refuses a
    /// directory or key that is not this user's alone.
    pub fn open(dir: &Path, engine: &Engine) -> Result<ArtifactCache, PluginError> {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).map_err(|source| PluginError::Io { path: dir.to_path_buf(), source })?;
        let meta = fs::symlink_metadata(dir).map_err(|source| PluginError::Io { path: dir.to_path_buf(), source })?;
        check_private(dir, &meta, true, 0o022)?;
        let key = seal_key(&dir.join(KEY_FILE))?;
        let mut hasher = ShaHasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = hex::encode(&hasher.0.finalize()[..8]);
        Ok(ArtifactCache {
            dir: dir.to_path_buf(),
            key,
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
        match read_private(&path) {
            Ok(file) => match unseal(&self.key, &path, &file) {
                Some(artifact) => {
                    // SAFETY: `Component::deserialize` trusts its input to be an artifact that
                    // wasmtime produced for this engine. These bytes are: the file has the name
                    // this cache computes from the wasm's hash and the engine's compatibility
                    // hash, and its seal, keyed with a secret only this user can read, proves it
                    // is the exact file `store` below wrote (a file put there by anyone else, or
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
            Err(error) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path = %path.display(), %error, "cached plugin artifact refused; recompiling");
            }
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
            let mut file = create_private(&temp)?;
            file.write_all(artifact)?;
            file.write_all(&seal(&self.key, path, artifact))?;
            file.sync_all()?;
            fs::rename(&temp, path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }
}

/// The seal of an artifact stored at `path`: binds the contents to the file's name, under `key`.
fn seal(key: &[u8; KEY_LEN], path: &Path, artifact: &[u8]) -> [u8; SEAL_LEN] {
    let name = path.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default();
    hmac_sha256(key, &[&(name.len() as u64).to_le_bytes(), name, artifact])
}

/// The artifact inside a cache file, if its seal matches.
fn unseal<'a>(key: &[u8; KEY_LEN], path: &Path, file: &'a [u8]) -> Option<&'a [u8]> {
    let split = file.len().checked_sub(SEAL_LEN)?;
    let (artifact, found) = file.split_at(split);
    // Constant time: how much of a forged seal matched says nothing.
    let expected = seal(key, path, artifact);
    let diff = expected.iter().zip(found).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    (diff == 0).then_some(artifact)
}

/// HMAC-SHA256 (RFC 2104) of the concatenation of `parts`.
fn hmac_sha256(key: &[u8; KEY_LEN], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes a key of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// The cache's seal key at `path`: read when it is there (and this user's alone), else created
/// from the system's randomness with mode 0600. Two processes that create it at once agree on
/// one: each writes its own beside it, and only the first hard link into place wins.
fn seal_key(path: &Path) -> Result<[u8; KEY_LEN], PluginError> {
    let io = |source| PluginError::Io { path: path.to_path_buf(), source };
    match read_key(path) {
        Err(PluginError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        read => return read,
    }
    let mut key = [0u8; KEY_LEN];
    fs::File::open("/dev/urandom").and_then(|mut r| r.read_exact(&mut key)).map_err(io)?;
    let temp = path.with_extension(format!("tmp-{}", std::process::id()));
    let written = create_private(&temp).and_then(|mut f| f.write_all(&key).and_then(|()| f.sync_all()));
    let linked = written.and_then(|()| fs::hard_link(&temp, path));
    let _ = fs::remove_file(&temp);
    match linked {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_key(path),
        Err(e) => Err(io(e)),
    }
}

/// Reads the seal key at `path`, refusing one that is not this user's alone.
fn read_key(path: &Path) -> Result<[u8; KEY_LEN], PluginError> {
    let io = |source| PluginError::Io { path: path.to_path_buf(), source };
    let mut file = open_nofollow(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    check_private(path, &meta, false, 0o077)?;
    let mut key = [0u8; KEY_LEN];
    if meta.len() != KEY_LEN as u64 {
        return Err(insecure(path, format!("a seal key is {KEY_LEN} bytes, this file has {}", meta.len())));
    }
    file.read_exact(&mut key).map_err(io)?;
    Ok(key)
}

/// Reads a cached artifact without following a symlink, if it is this user's regular file.
fn read_private(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut file = open_nofollow(path)?;
    let meta = file.metadata()?;
    check_private(path, &meta, false, 0o022)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e))?;
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Opens `path` for reading; a symlink in its last component is an error, never followed.
fn open_nofollow(path: &Path) -> std::io::Result<fs::File> {
    let mut options = fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    options.custom_flags(libc::O_NOFOLLOW);
    options.open(path)
}

/// Creates a new file (never an existing one, never through a symlink) only this user can read.
fn create_private(path: &Path) -> std::io::Result<fs::File> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    options.open(path)
}

/// Refuses `path` (with `meta`, not followed through a symlink) unless it is a directory (`dir`)
/// or a regular file, owned by this user, with none of the `forbidden` mode bits.
fn check_private(path: &Path, meta: &fs::Metadata, dir: bool, forbidden: u32) -> Result<(), PluginError> {
    let kind = meta.file_type();
    if kind.is_symlink() {
        return Err(insecure(path, "a symlink".into()));
    }
    if (dir && !kind.is_dir()) || (!dir && !kind.is_file()) {
        return Err(insecure(path, format!("not a {}", if dir { "directory" } else { "regular file" })));
    }
    #[cfg(unix)]
    {
        // SAFETY: `geteuid` has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(insecure(path, format!("owned by uid {}, not this user (uid {me})", meta.uid())));
        }
        let mode = meta.mode() & 0o777;
        if mode & forbidden != 0 {
            return Err(insecure(
                path,
                format!("mode {mode:03o} lets other users in (allowed: {:03o})", 0o777 & !forbidden),
            ));
        }
    }
    Ok(())
}

fn insecure(path: &Path, reason: String) -> PluginError {
    PluginError::InsecureCache { path: path.to_path_buf(), reason }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{chown, symlink, PermissionsExt};
    use std::path::{Path, PathBuf};

    use super::*;

    const KEY: [u8; KEY_LEN] = [7; KEY_LEN];

    /// A fresh directory (mode 0700) under the system temp dir, removed when dropped.
    struct Dir(PathBuf);

    impl Dir {
        fn new(label: &str) -> Dir {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("meridian-cache-test-{}-{n}-{label}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir(&path).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
            Dir(path)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn engine() -> Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        Engine::new(&config).unwrap()
    }

    /// The reason the cache at `dir` is refused.
    fn refusal(dir: &Path) -> String {
        match ArtifactCache::open(dir, &engine()) {
            Err(PluginError::InsecureCache { reason, .. }) => reason,
            Err(other) => panic!("refused, but not as insecure: {other}"),
            Ok(_) => panic!("{} is accepted", dir.display()),
        }
    }

    /// Gives `path` to another user (as root, which the test suite runs as).
    fn give_away(path: &Path) {
        // SAFETY: `geteuid` has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "giving a file to another user needs root");
        chown(path, Some(65534), None).unwrap();
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2 of RFC 4231 has a 4-byte key; HMAC pads any short key with zeros.
        let mut key = [0u8; KEY_LEN];
        key[..4].copy_from_slice(b"Jefe");
        assert_eq!(
            hex::encode(hmac_sha256(&key, &[b"what do ya want ", b"for nothing?"])),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn the_seal_binds_contents_name_and_key() {
        let path = Path::new("/c/abc-123.cwasm");
        let mut file = b"artifact".to_vec();
        file.extend_from_slice(&seal(&KEY, path, b"artifact"));
        assert_eq!(unseal(&KEY, path, &file), Some(&b"artifact"[..]));
        assert_eq!(unseal(&KEY, Path::new("/c/other-123.cwasm"), &file), None);
        assert_eq!(unseal(&[8; KEY_LEN], path, &file), None, "a seal made without the key is refused");
        // The unkeyed seal anyone could compute is refused too.
        let mut unkeyed = b"artifact".to_vec();
        unkeyed.extend_from_slice(&Sha256::digest(b"artifact"));
        assert_eq!(unseal(&KEY, path, &unkeyed), None);
        file[0] ^= 1;
        assert_eq!(unseal(&KEY, path, &file), None);
        assert_eq!(unseal(&KEY, path, b"short"), None);
    }

    #[test]
    fn a_new_cache_is_private_and_keeps_its_key() {
        let dir = Dir::new("new");
        let cache = dir.0.join("cache");
        let first = ArtifactCache::open(&cache, &engine()).unwrap();
        assert_eq!(fs::metadata(&cache).unwrap().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(cache.join(KEY_FILE)).unwrap().mode() & 0o777, 0o600);
        let again = ArtifactCache::open(&cache, &engine()).unwrap();
        assert_eq!(first.key, again.key, "the key is kept");
        assert_ne!(first.key, [0; KEY_LEN]);
        let other = Dir::new("other");
        assert_ne!(ArtifactCache::open(&other.0, &engine()).unwrap().key, first.key, "each cache has its own");
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        for mode in [0o770, 0o707, 0o777] {
            let dir = Dir::new("writable");
            fs::set_permissions(&dir.0, fs::Permissions::from_mode(mode)).unwrap();
            assert!(refusal(&dir.0).contains("lets other users in"), "mode {mode:o}");
        }
        let dir = Dir::new("readable");
        fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(ArtifactCache::open(&dir.0, &engine()).is_ok(), "others may read (the key is theirs to not read)");
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        let dir = Dir::new("owner");
        give_away(&dir.0);
        assert!(refusal(&dir.0).contains("owned by uid 65534"));
    }

    #[test]
    fn a_symlinked_directory_is_refused() {
        let dir = Dir::new("symlink");
        let real = dir.0.join("real");
        fs::create_dir(&real).unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
        let link = dir.0.join("link");
        symlink(&real, &link).unwrap();
        assert_eq!(refusal(&link), "a symlink");
    }

    #[test]
    fn a_key_others_can_read_or_write_is_refused() {
        for mode in [0o640, 0o604, 0o620] {
            let dir = Dir::new("key-mode");
            ArtifactCache::open(&dir.0, &engine()).unwrap();
            fs::set_permissions(dir.0.join(KEY_FILE), fs::Permissions::from_mode(mode)).unwrap();
            assert!(refusal(&dir.0).contains("lets other users in"), "mode {mode:o}");
        }
    }

    #[test]
    fn a_key_of_another_user_is_refused() {
        let dir = Dir::new("key-owner");
        ArtifactCache::open(&dir.0, &engine()).unwrap();
        give_away(&dir.0.join(KEY_FILE));
        assert!(refusal(&dir.0).contains("owned by uid 65534"));
    }

    #[test]
    fn a_symlinked_key_is_refused_and_never_followed() {
        let dir = Dir::new("key-symlink");
        let planted = dir.0.join("planted");
        fs::write(&planted, KEY).unwrap();
        fs::set_permissions(&planted, fs::Permissions::from_mode(0o600)).unwrap();
        symlink(&planted, dir.0.join(KEY_FILE)).unwrap();
        match ArtifactCache::open(&dir.0, &engine()) {
            Err(PluginError::Io { source, .. }) => assert_eq!(source.raw_os_error(), Some(libc::ELOOP), "{source}"),
            Err(other) => panic!("refused for another reason: {other}"),
            Ok(_) => panic!("a symlinked key is used"),
        }
    }

    #[test]
    fn a_symlinked_artifact_is_never_read() {
        let dir = Dir::new("artifact");
        let planted = dir.0.join("planted");
        fs::write(&planted, b"native code").unwrap();
        let artifact = dir.0.join("abc-123.cwasm");
        symlink(&planted, &artifact).unwrap();
        assert_eq!(read_private(&artifact).unwrap_err().raw_os_error(), Some(libc::ELOOP));
        // A regular file is read; one others may write is refused.
        fs::write(artifact.with_extension("x"), b"ok").unwrap();
        fs::set_permissions(artifact.with_extension("x"), fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_private(&artifact.with_extension("x")).unwrap(), b"ok");
        fs::set_permissions(artifact.with_extension("x"), fs::Permissions::from_mode(0o666)).unwrap();
        let refused = read_private(&artifact.with_extension("x")).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn the_default_directory_is_per_user() {
        let some = |s: &str| Some(std::ffi::OsString::from(s));
        assert_eq!(dir_under(some("/x/cache"), some("/home/u")), Path::new("/x/cache/meridian/plugins"));
        assert_eq!(dir_under(None, some("/home/u")), Path::new("/home/u/.cache/meridian/plugins"));
        assert_eq!(dir_under(some("rel"), some("/home/u")), Path::new("/home/u/.cache/meridian/plugins"));
        assert_eq!(dir_under(None, None), Path::new(".meridian/plugin-cache"));
    }
}
