//! Errors of the drclone library.
//!
//! Inside the library every failure is a detailed [`Error`] that names what went wrong
//! and where (store, volume, chunk, pack).  At the public edge those collapse onto a
//! small set of [`ErrorKind`]s, and each kind maps straight onto the only errno values
//! the NBD protocol allows (EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP,
//! ESHUTDOWN) and onto the errno a FUSE reply carries.

use std::path::PathBuf;

/// Coarse, prescriptive classes of failure; what a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller asked for something malformed (bad name, range, size).
    InvalidInput,
    /// The named object does not exist.
    NotFound,
    /// The object already exists.
    AlreadyExists,
    /// The object is read-only (a recovery point) or the operation is refused.
    PermissionDenied,
    /// Stored data failed an integrity check, or the disk returned an error.
    Io,
    /// The key is missing or wrong.
    Key,
    /// The disk is full.
    NoSpace,
    /// The feature is not supported.
    Unsupported,
    /// The store is shutting down.
    Shutdown,
}

impl ErrorKind {
    /// The errno an NBD reply or FUSE reply carries for this kind.
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::InvalidInput | ErrorKind::NotFound | ErrorKind::AlreadyExists => {
                libc::EINVAL
            }
            ErrorKind::PermissionDenied | ErrorKind::Key => libc::EPERM,
            ErrorKind::Io => libc::EIO,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Unsupported => libc::ENOTSUP,
            ErrorKind::Shutdown => libc::ESHUTDOWN,
        }
    }
}

/// A detailed error.  Every variant's message tells the operator what and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} is read-only")]
    ReadOnly(String),
    /// Removal refused: NBD clients or open FUSE files use the object.  The text
    /// names the object and its users ("... is in use by ...").
    #[error("{0}")]
    Busy(String),
    /// A DR action refused by the group's role (failover of a failed-over group,
    /// replication into a failed-over one, a stale fencing epoch).  The text
    /// names the group, its role and what to do instead.
    #[error("{0}")]
    Refused(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata database {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("store {store}: chunk {chunk} (pack {pack} offset {offset}): {what}")]
    Corrupt {
        store: PathBuf,
        chunk: String,
        pack: u64,
        offset: u64,
        what: String,
    },
    #[error("store {store}: {what}")]
    Format { store: PathBuf, what: String },
    #[error("{0}")]
    Key(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("store is shutting down")]
    Shutdown,
    /// The store latched read-only after a failed write or sync (fsyncgate: after a
    /// failed fsync the kernel may have dropped the dirty pages, so a retry that
    /// succeeds proves nothing).  Reads still work; every write, flush and catalog
    /// change fails with this until the store is reopened, which recovers from what
    /// is durable.
    #[error(
        "store {store} is read-only after a failed {what}: {cause}; writes acknowledged \
         since the last successful flush may not be durable; fix the disk, then restart \
         (the store recovers on open)"
    )]
    Latched {
        store: PathBuf,
        what: String,
        cause: String,
    },
    /// A pack the index pointed at no longer exists (GC deleted or compacted it
    /// between the lookup and the read): look the chunk up again.
    #[error("pack {pack} is gone")]
    PackGone { pack: u64 },
    /// A request to the object store that holds the packs failed (after the
    /// client's own retries).  Names the operation and the object (`s3://...`).
    #[error("object store: {op} {object}: {cause}")]
    ObjectStore {
        op: &'static str,
        object: String,
        cause: String,
    },
    /// Sealed packs waiting for upload to the object store (plus the open pack)
    /// reached the store's bound on unsent bytes: the write is refused (ENOSPC
    /// over NBD) rather than filling the local disk.  The text names the backlog,
    /// the bound and the last upload error.
    #[error("{0}")]
    UploadBacklog(String),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Invalid(_) => ErrorKind::InvalidInput,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Exists(_) => ErrorKind::AlreadyExists,
            Error::ReadOnly(_) | Error::Busy(_) | Error::Refused(_) => ErrorKind::PermissionDenied,
            Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                ErrorKind::NoSpace
            }
            Error::UploadBacklog(_) => ErrorKind::NoSpace,
            Error::ObjectStore { .. } => ErrorKind::Io,
            Error::Io { .. }
            | Error::Db { .. }
            | Error::Corrupt { .. }
            | Error::Format { .. }
            | Error::Latched { .. }
            | Error::PackGone { .. } => ErrorKind::Io,
            Error::Key(_) => ErrorKind::Key,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::Shutdown => ErrorKind::Shutdown,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Error {
        Error::Invalid(msg.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach a path to a `std::io::Result`.
pub(crate) trait IoContext<T> {
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_nbd_legal_errnos() {
        let legal = [
            libc::EPERM,
            libc::EIO,
            libc::ENOMEM,
            libc::EINVAL,
            libc::ENOSPC,
            libc::EOVERFLOW,
            libc::ENOTSUP,
            libc::ESHUTDOWN,
        ];
        for k in [
            ErrorKind::InvalidInput,
            ErrorKind::NotFound,
            ErrorKind::AlreadyExists,
            ErrorKind::PermissionDenied,
            ErrorKind::Io,
            ErrorKind::Key,
            ErrorKind::NoSpace,
            ErrorKind::Unsupported,
            ErrorKind::Shutdown,
        ] {
            assert!(legal.contains(&k.errno()), "{k:?}");
        }
        let full = Error::io("/x", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(full.kind(), ErrorKind::NoSpace);
    }
}
