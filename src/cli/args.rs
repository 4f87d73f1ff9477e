//! The command-line grammar (clap): every command, flag and help text.
//! `docs/DESIGN.md` §13: the daemon parses forwarded argv with these same types.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about, long_about = None)]
pub(crate) struct Cli {
    /// Store directory.
    #[arg(
        long,
        global = true,
        env = "DRCLONE_STORE",
        default_value = "./drclone-store"
    )]
    pub(crate) store: PathBuf,
    /// Key file of an encrypted store (default: the path recorded at init).
    #[arg(long, global = true, env = "DRCLONE_KEY_FILE")]
    pub(crate) key_file: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Create a new store.
    Init {
        /// Chunk size (power of two, 4K to 4M).
        #[arg(long, default_value = "64K")]
        chunk_size: String,
        /// Compression of stored chunks.
        #[arg(long, default_value = "zstd")]
        compression: String,
        /// Encrypt chunks with AES-256-GCM under the key in --key-file (created if missing).
        #[arg(long)]
        encrypt: bool,
        /// Target size of a pack file.
        #[arg(long, default_value = "64M", hide = true)]
        pack_size: String,
        /// Keep sealed packs on an S3-compatible object store: s3://BUCKET/PREFIX
        /// (credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or --s3-credentials).
        #[arg(long, value_name = "URL", group = "s3_target")]
        backend: Option<String>,
        /// Rebuild a store whose packs and catalog are on an object store
        /// (s3://BUCKET/PREFIX), after its host was lost: every group, volume and
        /// point up to the last catalog checkpoint, then served like any store.
        #[arg(long, value_name = "URL", group = "s3_target")]
        from_backend: Option<String>,
        /// S3 endpoint URL (radosgw, MinIO: http://HOST:PORT); default AWS.
        #[arg(long, value_name = "URL", requires = "s3_target")]
        s3_endpoint: Option<String>,
        /// S3 region.
        #[arg(long, default_value = "us-east-1", requires = "s3_target")]
        s3_region: String,
        /// A credentials file (aws_access_key_id = ..., aws_secret_access_key = ...),
        /// read at every open instead of the environment; its path is recorded.
        #[arg(long, value_name = "FILE", requires = "s3_target")]
        s3_credentials: Option<PathBuf>,
        /// Bytes of local disk cache for data read back from the object store.
        #[arg(long, default_value = "1G", requires = "s3_target")]
        cache_size: String,
        /// Bound on data not yet uploaded (sealed packs waiting plus the open one):
        /// past it writes fail with ENOSPC.  Default: half the free space at open.
        #[arg(long, value_name = "BYTES", requires = "s3_target")]
        s3_pending_max: Option<String>,
    },
    /// Manage groups (protected applications).
    #[command(subcommand)]
    Group(GroupCmd),
    /// Manage volumes (GROUP/DISK).
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Import a raw image into a volume's head (sparse, deduplicated).
    Import { volume: String, file: PathBuf },
    /// Export a head or a point (GROUP/DISK[@POINT]) to a sparse raw file.
    Export { volume: String, file: PathBuf },
    /// Manage recovery points.
    #[command(subcommand)]
    Point(PointCmd),
    /// Manage retention.
    #[command(subcommand)]
    Retention(RetentionCmd),
    /// DR drill: clone every volume of GROUP at a point (O(1)), export the clones,
    /// run --exec CMD against them, report, and remove them unless --keep.
    Test {
        group: String,
        /// latest, latest-app or a point id.
        #[arg(long, default_value = "latest")]
        point: String,
        /// Command run through `sh -c` with DRCLONE_EXPORTS (the clones' NBD URIs,
        /// one per line, in disk order); the drill fails if it fails.
        #[arg(long)]
        exec: Option<String>,
        /// Keep the clones after the drill (until --ttl or `drill rm`).
        #[arg(long)]
        keep: bool,
        /// How long kept clones live, e.g. 2h (default 2h).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Drills: list them, show one's report, remove one's clones and record.
    #[command(subcommand)]
    Drill(DrillCmd),
    /// Recovery plans: bring applications up in order (a TOML file of steps:
    /// groups, point, pre/post scripts, timeouts, waits).
    #[command(subcommand)]
    Plan(PlanCmd),
    /// Fail GROUP over: its export names move to writable heads cloned from a
    /// point (O(1)); --undo goes back, --commit keeps them.
    Failover {
        group: String,
        /// latest, latest-app or a point id (on a failed-over group: change the point).
        #[arg(long, conflicts_with_all = ["planned", "undo", "commit"])]
        point: Option<String>,
        /// Take a final point now and fail over to it.
        #[arg(long, conflicts_with_all = ["undo", "commit"])]
        planned: bool,
        /// Roll a failover back: the names return to the replica heads.
        #[arg(long, conflicts_with = "commit")]
        undo: bool,
        /// Keep the failover heads as the group's heads.
        #[arg(long)]
        commit: bool,
    },
    /// Replicate sources on this (protected) host into a drclone target: each
    /// cycle sends only the chunks the target lacks and commits one recovery point
    /// of the group.  Without --interval, one cycle.
    Replicate {
        /// The target's replication address (its `serve --replication-listen`).
        #[arg(long, value_name = "HOST:PORT")]
        target: String,
        /// GROUP/DISK=SOURCE (a file, a block device, or an NBD URI); repeat for
        /// every disk of the group.
        #[arg(long = "volume", value_name = "GROUP/DISK=SOURCE", required = true)]
        volumes: Vec<String>,
        /// Repeat every DURATION (e.g. 5m), retrying with backoff when the target
        /// is away.
        #[arg(long)]
        interval: Option<String>,
        /// Where the manifests of the last cycles live
        /// (default ~/.local/state/drclone).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// File holding the token the target wants.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Limit the bytes per second on the wire (e.g. 20M).
        #[arg(long, value_name = "RATE")]
        bwlimit: Option<String>,
        /// Run before the sources are read (e.g. fsfreeze -f); failure skips the cycle.
        #[arg(long, value_name = "CMD")]
        pre_snapshot: Option<String>,
        /// Run after they are read; with --pre-snapshot, success makes an
        /// app-consistent point.
        #[arg(long, value_name = "CMD")]
        post_snapshot: Option<String>,
        /// Label of the points.
        #[arg(long)]
        label: Option<String>,
        /// NBD sources: read only the blocks qemu's dirty bitmap NAME marks
        /// (qemu-nbd -B NAME, qemu-storage-daemon, libvirt pull backups).
        #[arg(long, value_name = "NAME")]
        dirty_bitmap: Option<String>,
        /// Replicate into a group whose role changed since this agent's last
        /// cycle (a failover was undone); without it such a cycle is refused.
        #[arg(long)]
        reprotect: bool,
        /// Speak TLS, trusting the PEM CA certificate(s) in FILE: the CA that
        /// signed the target's `serve --tls-cert`.
        #[arg(long, value_name = "FILE")]
        tls_ca: Option<PathBuf>,
    },
    /// Per group: role, latest points, RPO, last drill.
    Status,
    /// The audit log of DR actions.
    Audit,
    /// Make a writable volume from a point: GROUP/DISK@POINT GROUP2/DISK2.
    Clone { source: String, target: String },
    /// Space used, and the dedup and compression ratios.
    Df,
    /// NBD clients of the running `serve` (id, peer, export, since when).
    Sessions,
    /// Reclaim space no head or point references.
    Gc,
    /// Re-read every chunk and check it.
    Verify,
    /// Mount volumes (GROUP/DISK) and points (GROUP/@ID/DISK) as files; stays in the
    /// foreground until Ctrl-C, SIGTERM or `fusermount3 -u DIR`.
    Mount { dir: PathBuf },
    /// Unmount a drclone mount, including a stale one left by a crash.
    Unmount { dir: PathBuf },
    /// Serve volumes and points over NBD; other commands then go through this daemon.
    Serve {
        /// TCP address for NBD.
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: String,
        /// Do not listen on TCP (only --socket, or --stdio).
        #[arg(long)]
        no_tcp: bool,
        /// Also serve NBD on this unix socket.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Serve one NBD connection on stdin/stdout, then exit (captive server).
        #[arg(long, short = 's')]
        stdio: bool,
        /// The export an empty export name means (e.g. for `nbd://HOST/`).
        #[arg(long)]
        default_export: Option<String>,
        /// NBD connections served at once; more get "too many connections".
        #[arg(long, default_value_t = 512)]
        max_connections: usize,
        /// Seconds a client may take to choose an export before it is dropped.
        #[arg(long, default_value_t = 30)]
        handshake_timeout: u64,
        /// Drop a client idle this many seconds (default: never).
        #[arg(long)]
        idle_timeout: Option<u64>,
        /// Serve Prometheus metrics on ADDR (e.g. 127.0.0.1:9810), at /metrics.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Receive replication on ADDR (default 127.0.0.1:10810; `off` for none).
        #[arg(long, value_name = "ADDR")]
        replication_listen: Option<String>,
        /// Agents must present the token in this file (`replicate --token-file`).
        #[arg(long, value_name = "FILE")]
        replication_token_file: Option<PathBuf>,
        /// Replication speaks only TLS, with this PEM certificate chain (needs
        /// --tls-key); agents then need --tls-ca.
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Fail GROUP back from this (DR) site to the original one: only the blocks
    /// changed since the newest point both hold travel, landing as points there;
    /// writes the original site made after that point are kept there in a
    /// `diverged-...` point.  --planned also stops the writers here and makes
    /// this site the replica again.
    Failback {
        group: String,
        /// The original site's replication address (its `serve --replication-listen`).
        #[arg(long, value_name = "HOST:PORT")]
        target: String,
        /// Delta passes until small, then fence the writers here, send the last
        /// delta and switch roles.
        #[arg(long)]
        planned: bool,
        /// File holding the token the target wants.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Speak TLS, trusting the PEM CA certificate(s) in FILE: the CA that
        /// signed the target's `serve --tls-cert`.
        #[arg(long, value_name = "FILE")]
        tls_ca: Option<PathBuf>,
        /// Limit the bytes per second on the wire (e.g. 20M).
        #[arg(long, value_name = "RATE")]
        bwlimit: Option<String>,
    },
    /// Failback to a plain host: make a local file or block device equal to
    /// GROUP/DISK[@POINT] of a drclone store, fetching only the chunks that
    /// differ (rsync-style), then verify every block.  Refuses a target that is
    /// mounted or open for writing unless --force.
    Restore {
        /// GROUP/DISK or GROUP/DISK@POINT (latest, latest-app or an id).
        volume: String,
        /// The store's replication address (its `serve --replication-listen`).
        #[arg(long, value_name = "HOST:PORT")]
        from: String,
        /// The file (created if missing) or block device to write.
        #[arg(long, value_name = "FILE_OR_DEVICE")]
        to: PathBuf,
        /// Write even if the target is mounted or open for writing elsewhere.
        #[arg(long)]
        force: bool,
        /// File holding the token the store wants.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Speak TLS, trusting the PEM CA certificate(s) in FILE: the CA that
        /// signed the target's `serve --tls-cert`.
        #[arg(long, value_name = "FILE")]
        tls_ca: Option<PathBuf>,
    },
    /// Send another drclone store the recovery points of GROUP that it lacks,
    /// incrementally from the newest point both hold (a first push is a full
    /// seed).  Refused if the target's heads moved on since that point.
    Push {
        group: String,
        /// The target's replication address (its `serve --replication-listen`).
        #[arg(long, value_name = "HOST:PORT")]
        target: String,
        /// File holding the token the target wants.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Speak TLS, trusting the PEM CA certificate(s) in FILE: the CA that
        /// signed the target's `serve --tls-cert`.
        #[arg(long, value_name = "FILE")]
        tls_ca: Option<PathBuf>,
        /// Limit the bytes per second on the wire (e.g. 20M).
        #[arg(long, value_name = "RATE")]
        bwlimit: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum GroupCmd {
    /// Create a group.
    Create { group: String },
    /// Change a group's settings.
    Set {
        group: String,
        /// The daemon takes a crash-consistent point of the group this often
        /// (e.g. 5s; `off` to stop): continuous protection for disks that qemu
        /// mirrors into drclone.
        #[arg(long, value_name = "DURATION")]
        checkpoint_interval: String,
    },
    /// List groups.
    List,
}

#[derive(Subcommand)]
pub(crate) enum VolumeCmd {
    /// Create a thin volume.
    Create {
        volume: String,
        #[arg(long)]
        size: String,
    },
    /// List volumes.
    List,
    /// Grow a volume.
    Resize {
        volume: String,
        #[arg(long)]
        size: String,
    },
    /// Remove a volume's head (points keep their data).
    Rm { volume: String },
}

#[derive(Subcommand)]
pub(crate) enum PointCmd {
    /// Take a recovery point of every volume of GROUP at once.
    Create {
        group: String,
        #[arg(long)]
        label: Option<String>,
        /// Mark the point app-consistent (the source was quiesced).
        #[arg(long)]
        app_consistent: bool,
    },
    /// List a group's points, oldest first.
    List { group: String },
    /// Remove a point.
    Rm { group: String, point: String },
}

#[derive(Subcommand)]
pub(crate) enum RetentionCmd {
    /// Record a retention policy such as "5m:24h,1h:7d,1d:30d" (the daemon thins
    /// points to it).
    Set {
        group: String,
        policy: String,
        /// The policy for app-consistent points (kept if either policy keeps them).
        #[arg(long)]
        app: bool,
    },
    /// Thin GROUP's points to its policy now.
    Apply { group: String },
}

#[derive(Subcommand)]
pub(crate) enum DrillCmd {
    /// Drills, oldest first.
    List,
    /// One drill's report.
    Show { id: u64 },
    /// Remove a drill's clones (disconnecting their clients) and its record.
    Rm { id: u64 },
    /// (internal, used by `drclone test`) Start a drill: clone and export.
    #[command(hide = true)]
    Start {
        group: String,
        #[arg(long, default_value = "latest")]
        point: String,
        #[arg(long)]
        keep: bool,
        #[arg(long)]
        ttl: Option<String>,
        #[arg(long)]
        command: Option<String>,
    },
    /// (internal, used by `drclone test`) Finish a drill: record its outcome.
    #[command(hide = true)]
    Finish {
        id: u64,
        #[arg(long, allow_negative_numbers = true)]
        exit_code: Option<i32>,
        #[arg(long)]
        duration_ms: u64,
        #[arg(long)]
        ready_ms: Option<u64>,
        #[arg(long, default_value = "")]
        output_tail: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum PlanCmd {
    /// Run a plan: each step's pre script, its groups failed over in parallel,
    /// its post script with DRCLONE_EXPORTS, its wait; a failing step stops it.
    /// With --test the groups are drilled instead, and every clone, export and
    /// drill record the plan made is removed at the end, whatever happened.
    Run {
        /// The plan (TOML); scripts run in its directory.
        file: PathBuf,
        /// Drill instead of failing over, and clean up at the end.
        #[arg(long)]
        test: bool,
    },
    /// Validate a plan without running it: syntax, unknown keys, groups and
    /// points in the store, scripts, durations; every problem with its line.
    Check {
        /// The plan (TOML).
        file: PathBuf,
    },
}
