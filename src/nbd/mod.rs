//! NBD: the wire protocol ([`proto`], engine-free), the server ([`server`]) that
//! maps it onto the store, its resource limits ([`limits`]) and the registry of
//! its sessions ([`sessions`]).  [`client`] is the other side: a blocking client
//! (reads, block status, qemu dirty bitmaps) on the same wire code, for replication.
//!
//! Why not the `nbd` crate (0.3.1): it implements only the oldstyle-free minimum
//! (READ, WRITE, FLUSH, simple replies) over a single-threaded `Read + Write + Seek`
//! export, with no option haggling beyond EXPORT_NAME, no structured replies, no block
//! status, no TRIM/WRITE_ZEROES/FUA/CACHE and no concurrent requests.  Every one of
//! those is required here, so the protocol is written in [`proto`], small and
//! spec-cited, and tested against qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh and fio.

pub mod client;
pub mod limits;
pub mod proto;
pub mod server;
pub mod sessions;
