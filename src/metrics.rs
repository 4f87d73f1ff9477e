//! Prometheus metrics (`serve --metrics ADDR`): the process-wide registry the
//! NBD server counts into, the DR state read at each scrape, and the HTTP
//! endpoint (`GET /metrics`, text exposition format 0.0.4 / OpenMetrics).
//!
//! Metric names (docs/DESIGN.md §17 lists them with their meaning):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `drclone_nbd_requests_total` | counter | `op` |
//! | `drclone_nbd_request_duration_seconds` | histogram | `op` |
//! | `drclone_nbd_sessions` | gauge | |
//! | `drclone_group_rpo_seconds` | gauge | `group` |
//! | `drclone_group_points` | gauge | `group` |
//! | `drclone_group_role` | gauge (1) | `group`, `role` |
//! | `drclone_group_last_drill_ok` | gauge (1/0) | `group` |
//! | `drclone_group_last_drill_timestamp_seconds` | gauge | `group` |
//! | `drclone_replication_received_bytes_total` | counter | `group` |
//! | `drclone_store_logical_bytes`, `drclone_store_stored_bytes` | gauge | |
//! | `drclone_store_dedup_ratio`, `drclone_store_compression_ratio` | gauge | |
//!
//! Store bytes come from `df`, which scans the block map: they are computed at
//! most once a minute and cached between scrapes.

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::error::{Error, Result};
use crate::Store;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Op {
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabel {
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabel {
    group: String,
    role: String,
}

/// The counters the data path updates (NBD, replication).
struct Live {
    requests: Family<Op, Counter>,
    latency: Family<Op, Histogram>,
    replication: Family<GroupLabel, Counter>,
}

fn live() -> &'static Live {
    static L: OnceLock<Live> = OnceLock::new();
    L.get_or_init(|| Live {
        requests: Family::default(),
        latency: Family::new_with_constructor(|| {
            // 10 us .. ~20 s
            Histogram::new(exponential_buckets(1e-5, 4.0, 11))
        }),
        replication: Family::default(),
    })
}

/// The name of an NBD command type (NBD spec `NBD_CMD_*`).
fn op_name(typ: u16) -> &'static str {
    use crate::nbd::proto::*;
    match typ {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write_zeroes",
        CMD_BLOCK_STATUS => "block_status",
        CMD_DISC => "disc",
        _ => "other",
    }
}

/// Count one NBD request of type `typ` that took `took`.
pub fn nbd_request(typ: u16, took: Duration) {
    let op = Op {
        op: op_name(typ).into(),
    };
    let l = live();
    l.requests.get_or_create(&op).inc();
    l.latency.get_or_create(&op).observe(took.as_secs_f64());
}

/// Count `bytes` of replication received for `group`.
pub fn replication_bytes(group: &str, bytes: u64) {
    live()
        .replication
        .get_or_create(&GroupLabel {
            group: group.into(),
        })
        .inc_by(bytes);
}

/// The store's df, recomputed at most once a minute.
fn store_bytes(store: &Store) -> Option<crate::engine::maint::DfReport> {
    static CACHE: Mutex<Option<(Instant, Arc<crate::engine::maint::DfReport>)>> = Mutex::new(None);
    let mut c = CACHE.lock().unwrap();
    if let Some((at, r)) = c.as_ref() {
        if at.elapsed() < Duration::from_secs(60) {
            return Some(crate::engine::maint::DfReport::clone(r));
        }
    }
    match crate::engine::maint::df(store) {
        Ok(r) => {
            *c = Some((Instant::now(), Arc::new(r.clone())));
            Some(r)
        }
        Err(e) => {
            log::warn!("metrics: df failed: {e}");
            None
        }
    }
}

/// The exposition text of every metric, now.  `sessions`: NBD sessions open.
/// Errors: the metadata database's (reading groups, points, drills).
pub fn render(store: &Store, sessions: usize) -> Result<String> {
    let mut reg = Registry::default();
    let l = live();
    reg.register(
        "drclone_nbd_requests",
        "NBD requests handled, by command",
        l.requests.clone(),
    );
    reg.register(
        "drclone_nbd_request_duration_seconds",
        "NBD request service time, by command",
        l.latency.clone(),
    );
    reg.register(
        "drclone_replication_received_bytes",
        "Replication bytes received, by group",
        l.replication.clone(),
    );
    let g_sessions: Gauge = Gauge::default();
    g_sessions.set(sessions as i64);
    reg.register("drclone_nbd_sessions", "NBD sessions open", g_sessions);
    let rpo: Family<GroupLabel, Gauge> = Family::default();
    let points: Family<GroupLabel, Gauge> = Family::default();
    let role: Family<RoleLabel, Gauge> = Family::default();
    let drill_ok: Family<GroupLabel, Gauge> = Family::default();
    let drill_ts: Family<GroupLabel, Gauge> = Family::default();
    for g in crate::dr::status::status(store, crate::util::now_secs())? {
        let lb = GroupLabel {
            group: g.group.clone(),
        };
        if let Some(s) = g.rpo_seconds {
            rpo.get_or_create(&lb).set(s as i64);
        }
        points.get_or_create(&lb).set(g.points as i64);
        role.get_or_create(&RoleLabel {
            group: g.group.clone(),
            role: g.role.to_string(),
        })
        .set(1);
        if let Some(d) = &g.last_drill {
            drill_ok
                .get_or_create(&lb)
                .set(i64::from(d.ok == Some(true)));
            drill_ts.get_or_create(&lb).set(d.time as i64);
        }
    }
    reg.register(
        "drclone_group_rpo_seconds",
        "Age of the group's latest recovery point",
        rpo,
    );
    reg.register("drclone_group_points", "Recovery points kept", points);
    reg.register(
        "drclone_group_role",
        "The group's DR role (1 for the current one)",
        role,
    );
    reg.register(
        "drclone_group_last_drill_ok",
        "1 if the group's last drill passed",
        drill_ok,
    );
    reg.register(
        "drclone_group_last_drill_timestamp_seconds",
        "Start of the group's last drill",
        drill_ts,
    );
    if let Some(df) = store_bytes(store) {
        let gauge = |v: i64| {
            let g: Gauge = Gauge::default();
            g.set(v);
            g
        };
        let ratio = |v: f64| {
            let g: Gauge<f64, AtomicU64> = Gauge::default();
            g.set(v);
            g
        };
        reg.register(
            "drclone_store_logical_bytes",
            "Data bytes the volume heads hold",
            gauge(df.logical_bytes as i64),
        );
        reg.register(
            "drclone_store_stored_bytes",
            "Bytes of chunks as stored (compressed, encrypted)",
            gauge(df.stored_bytes as i64),
        );
        reg.register(
            "drclone_store_dedup_ratio",
            "Logical bytes per unique byte",
            ratio(df.dedup_ratio),
        );
        reg.register(
            "drclone_store_compression_ratio",
            "Unique bytes per stored byte",
            ratio(df.compression_ratio),
        );
    }
    let mut out = String::new();
    encode(&mut out, &reg).map_err(|e| Error::invalid(format!("metrics encoding: {e}")))?;
    Ok(out)
}

/// Serve `GET /metrics` on `addr` until `stop` is set.  Errors: binding `addr`.
pub fn serve(
    addr: &str,
    store: Arc<Store>,
    sessions: impl Fn() -> usize + Send + 'static,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| Error::invalid(format!("metrics: cannot listen on {addr}: {e}")))?;
    log::info!("metrics on http://{addr}/metrics");
    Ok(std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let req = match server.recv_timeout(Duration::from_millis(200)) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    log::warn!("metrics: {e}");
                    continue;
                }
            };
            let resp = if req.url() == "/metrics" {
                match render(&store, sessions()) {
                    Ok(body) => tiny_http::Response::from_string(body).with_header(
                        "Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"
                            .parse::<tiny_http::Header>()
                            .unwrap(),
                    ),
                    Err(e) => {
                        let mut m = String::new();
                        let _ = write!(m, "drclone metrics: {e}\n");
                        tiny_http::Response::from_string(m).with_status_code(500)
                    }
                }
            } else {
                tiny_http::Response::from_string("drclone: see /metrics\n").with_status_code(404)
            };
            let _ = req.respond(resp);
        }
    }))
}
