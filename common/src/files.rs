//! Secret files: created with mode 0600 from the first byte on (never chmod-ed after a window
//! in which they were world-readable), written atomically so a crash leaves the old file or
//! the new one, never half of one.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a secret or state file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file system refused; the message names the path so an operator can fix permissions.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being attempted ("write", "read", "create directory").
        action: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A secret file is readable by other users: refuse to use it rather than trust a key that
    /// may have been copied.
    #[error(
        "{path} has mode {mode:o}, readable by other users; run `chmod 600 {path}` (and consider the key compromised)"
    )]
    TooOpen {
        /// The path concerned.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` (and parents) with mode 0700 where it does not exist yet.
pub fn create_private_dir(dir: &Path) -> Result<(), FileError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create directory", dir))
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))
    }
}

fn write_with_mode(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = (|| {
        let mut f = opts.open(&tmp).map_err(io_err("write", &tmp))?;
        f.write_all(contents).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("write", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err("write", path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes a secret (private key, token, PSK) readable by the owner only.
pub fn write_secret(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    write_with_mode(path, contents, 0o600)
}

/// Writes a public file (certificate, configuration without secrets).
pub fn write_public(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    write_with_mode(path, contents, 0o644)
}

/// Reads a secret file, refusing one that group or others can read.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, FileError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(io_err("read", path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(FileError::TooOpen {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    std::fs::read(path).map_err(io_err("read", path))
}

/// Reads a non-secret file with an error that names the path.
pub fn read_public(path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(io_err("read", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(unix)]
    fn secrets_are_0600_and_open_ones_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("k");
        write_secret(&p, b"secret").expect("write");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_secret(&p).expect("read"), b"secret");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(read_secret(&p), Err(FileError::TooOpen { .. })));
        // overwriting keeps 0600 and leaves no temp file behind
        write_secret(&p, b"new").expect("rewrite");
        let names: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").collect();
        assert_eq!(names.len(), 1);
    }
}
