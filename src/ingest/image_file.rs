//! Reading a catalogue row's image file safely. Catalogues come from suppliers and sellers, so
//! an image path is untrusted: it must resolve (after following symlinks) inside the
//! catalogue's folder or another root the operator allowed, name a regular file (never a
//! FIFO, device or directory, which could hang or flood the reader), and fit a size limit
//! that is enforced while reading, not only from the file's metadata.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Default for [`ImagePolicy::max_bytes`]: the size the server accepts for one image.
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 32 << 20;

/// Where image files may be read from, and how large they may be.
#[derive(Debug, Clone)]
pub struct ImagePolicy {
    /// Canonical directories an image must resolve into.
    roots: Vec<PathBuf>,
    pub max_bytes: u64,
}

/// Why an image file was not read.
#[derive(Debug, thiserror::Error)]
pub enum ImageFileError {
    #[error(
        "resolves to {}, outside the catalogue's folder and the allowed roots (see --allow-image-root)",
        shorten(resolved)
    )]
    Outside { resolved: PathBuf },
    #[error("is not a regular file ({0})")]
    NotRegular(&'static str),
    #[error("is larger than the {limit}-byte limit (see --max-image-bytes)")]
    TooLarge { limit: u64 },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A path for a message: at most 200 characters (the start and the end kept).
pub fn shorten(p: &Path) -> String {
    crate::ids::shorten(&p.display().to_string(), 200)
}

impl ImagePolicy {
    /// Images of `catalog` may come from its folder and from `extra_roots`.
    pub fn for_catalog(catalog: &Path, extra_roots: &[PathBuf], max_bytes: u64) -> std::io::Result<Self> {
        let folder = catalog.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let mut roots = vec![std::fs::canonicalize(folder)?];
        for r in extra_roots {
            roots.push(std::fs::canonicalize(r).map_err(|e| {
                std::io::Error::new(e.kind(), format!("--allow-image-root {}: {e}", r.display()))
            })?);
        }
        Ok(ImagePolicy { roots, max_bytes })
    }

    /// The bytes of the image at `path`, if the policy allows it.
    pub fn read(&self, path: &Path) -> Result<Vec<u8>, ImageFileError> {
        let resolved = std::fs::canonicalize(path)?;
        if !self.roots.iter().any(|root| resolved.starts_with(root)) {
            return Err(ImageFileError::Outside { resolved });
        }
        // Checked before opening: opening a FIFO blocks until a writer appears.
        let kind = std::fs::metadata(&resolved)?.file_type();
        if !kind.is_file() {
            return Err(ImageFileError::NotRegular(describe(kind)));
        }
        let file = File::open(&resolved)?;
        // Checked again on the open file, in case the path was swapped in between.
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(ImageFileError::NotRegular(describe(meta.file_type())));
        }
        if meta.len() > self.max_bytes {
            return Err(ImageFileError::TooLarge { limit: self.max_bytes });
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        // The limit holds while reading too (a file that grows, or lies about its size).
        file.take(self.max_bytes + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > self.max_bytes {
            return Err(ImageFileError::TooLarge { limit: self.max_bytes });
        }
        Ok(bytes)
    }
}

fn describe(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a plain file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_inside_the_roots_within_the_limit_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let cat_dir = dir.path().join("cat");
        let other = dir.path().join("other");
        std::fs::create_dir_all(cat_dir.join("images")).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(cat_dir.join("images/a.jpg"), b"abc").unwrap();
        std::fs::write(other.join("b.jpg"), b"def").unwrap();
        std::fs::write(cat_dir.join("big.jpg"), vec![0u8; 100]).unwrap();
        std::os::unix::fs::symlink(other.join("b.jpg"), cat_dir.join("link.jpg")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", cat_dir.join("passwd.jpg")).unwrap();
        let catalog = cat_dir.join("catalog.csv");
        let p = ImagePolicy::for_catalog(&catalog, &[], 50).unwrap();

        assert_eq!(p.read(&cat_dir.join("images/a.jpg")).unwrap(), b"abc");
        for outside in [
            cat_dir.join("../other/b.jpg"),
            cat_dir.join("link.jpg"),
            cat_dir.join("passwd.jpg"),
            PathBuf::from("/etc/passwd"),
            PathBuf::from("/proc/self/environ"),
        ] {
            let e = p.read(&outside).unwrap_err();
            assert!(matches!(e, ImageFileError::Outside { .. }), "{}: {e}", outside.display());
        }
        assert!(matches!(p.read(&cat_dir.join("big.jpg")), Err(ImageFileError::TooLarge { limit: 50 })));
        assert!(matches!(p.read(&cat_dir.join("images")), Err(ImageFileError::NotRegular("a directory"))));
        assert!(matches!(p.read(&cat_dir.join("missing.jpg")), Err(ImageFileError::Io(_))));

        // A root the operator allows widens the policy, symlinks into it included.
        let wide = ImagePolicy::for_catalog(&catalog, std::slice::from_ref(&other), 50).unwrap();
        assert_eq!(wide.read(&cat_dir.join("link.jpg")).unwrap(), b"def");
        // Devices are refused even inside an allowed root (and never read: /dev/zero).
        let dev = ImagePolicy::for_catalog(&catalog, &[PathBuf::from("/dev")], 50).unwrap();
        assert!(matches!(dev.read(Path::new("/dev/zero")), Err(ImageFileError::NotRegular("a device"))));
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.jpg");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            return; // no mkfifo here
        }
        let p = ImagePolicy::for_catalog(&dir.path().join("c.csv"), &[], 50).unwrap();
        assert!(matches!(p.read(&fifo), Err(ImageFileError::NotRegular("a FIFO"))));
    }

    #[test]
    fn long_paths_are_shortened_in_messages() {
        let long = PathBuf::from("x".repeat(10_000));
        let s = shorten(&long);
        assert!(s.len() < 260 && s.contains("10000 characters"), "{s}");
        assert_eq!(shorten(Path::new("/a/b.jpg")), "/a/b.jpg");
    }
}
