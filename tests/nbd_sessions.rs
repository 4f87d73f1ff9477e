//! The session registry in process, over real socket pairs: every connection is
//! listed with its export, and `disconnect_export` drops exactly the clients of
//! one export, lets their in-flight requests finish, and returns only when they
//! are gone; the others keep working.  Plus `drclone sessions` against a daemon.

mod common;
mod nbd_raw;

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use drclone::engine::store::{InitOptions, Store};
use drclone::nbd::limits::Limits;
use drclone::nbd::proto::*;
use drclone::nbd::server::{serve_session, Shared};
use nbd_raw::*;

/// Serve one end of a socket pair as a registered session; returns the other end.
fn connect(shared: &Arc<Shared>, peer: &str) -> (UnixStream, std::thread::JoinHandle<()>) {
    let (client, server) = UnixStream::pair().unwrap();
    let r = server.try_clone().unwrap();
    let closer = server.try_clone().unwrap();
    let session = shared.sessions.register(
        peer,
        Box::new(move |how| {
            let _ = closer.shutdown(how);
        }),
    );
    let shared = shared.clone();
    let t = std::thread::spawn(move || {
        serve_session(&shared, Box::new(r), Box::new(server), &session);
    });
    (client, t)
}

fn go_on(s: UnixStream, export: &str, structured: bool) -> Client {
    let mut s = s;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let g = rx(&mut s, 18).unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    use std::io::Write;
    s.write_all(&3u32.to_be_bytes()).unwrap();
    if structured {
        negotiate_structured(&mut s);
    }
    let (size, tflags) = go(&mut s, export).unwrap();
    Client {
        s,
        size,
        tflags,
        structured,
    }
}

#[test]
fn disconnect_export_drops_only_its_clients_after_their_requests() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    Store::init(&path, &InitOptions::default()).unwrap();
    let store = Arc::new(Store::open(&path, None).unwrap());
    store.create_group("g").unwrap();
    store.create_volume("g", "d", 64 << 20).unwrap();
    store.create_volume("g", "e", 64 << 20).unwrap();
    let shared = Shared::new(store.clone(), None, Limits::default());

    let (a, ta) = connect(&shared, "a");
    let (b, tb) = connect(&shared, "b");
    let (e, te) = connect(&shared, "e");
    let (_idle, _ti) = connect(&shared, "still negotiating");
    let mut a = go_on(a, "g/d", true);
    let mut b = go_on(b, "g/d", false);
    let mut e = go_on(e, "g/e", false);
    let l = shared.sessions.list();
    assert_eq!(l.len(), 4);
    let on: Vec<_> = l
        .iter()
        .map(|s| (s.peer.as_str(), s.export.clone(), s.writable))
        .collect();
    assert!(on.contains(&("a", Some("g/d".into()), true)), "{on:?}");
    assert!(on.contains(&("e", Some("g/e".into()), true)), "{on:?}");
    assert!(on.contains(&("still negotiating", None, false)), "{on:?}");

    // `a` has writes in flight when the disconnect comes: they complete (and are
    // answered if the socket still takes it) before disconnect_export returns.
    let data = random_bytes(1, 1 << 20);
    for i in 0..8u64 {
        a.send(0, CMD_WRITE, i, i << 20, 1 << 20, &data);
    }
    assert_eq!(b.call(0, CMD_READ, 0, 4096, &[]).error, 0);
    let n = shared
        .sessions
        .disconnect_export("g/d", Duration::from_secs(60))
        .unwrap();
    assert_eq!(n, 2);
    // Gone from the registry, and their threads have returned.
    ta.join().unwrap();
    tb.join().unwrap();
    let left: Vec<_> = shared.sessions.list().into_iter().map(|s| s.peer).collect();
    assert_eq!(left.len(), 2, "{left:?}");
    // Their sockets are closed: whatever replies made it out, then end of stream.
    while a.reply(0).is_ok() {}
    let gone = b.try_send(0, CMD_READ, 1, 0, 4096, &[]).is_err() || b.reply(4096).is_err();
    assert!(gone, "a disconnected client was still served");
    // The client of the other export did not notice.
    assert_eq!(e.call(0, CMD_WRITE, 0, 4096, &data[..4096]).error, 0);
    assert_eq!(e.call(0, CMD_READ, 0, 4096, &[]).data, data[..4096]);
    // Whatever of `a`'s writes ran, ran whole: every 1 MiB block is old or new.
    let mut c = {
        let (s, _t) = connect(&shared, "check");
        go_on(s, "g/d", false)
    };
    for i in 0..8u64 {
        let got = c.call(0, CMD_READ, i << 20, 1 << 20, &[]).data;
        assert!(
            got == data || got == vec![0u8; 1 << 20],
            "block {i} is torn"
        );
    }
    e.disconnect();
    c.disconnect();
    te.join().unwrap();
    drop(shared);
    store.close().unwrap();
}

#[test]
fn sessions_command_lists_the_daemons_clients() {
    let env = Env::new();
    env.ok(&["init"]);
    env.ok(&["group", "create", "g"]);
    env.ok(&["volume", "create", "g/d", "--size", "1M"]);
    // No daemon: nobody is connected.
    assert_eq!(env.json(&["sessions"]), serde_json::json!([]));
    let d = Daemon::start(&env.store, &env.path("nbd.sock"), &[], &[]);
    let c = Client::go(&d.sock, "g/d", false, false);
    let v = env.json(&["sessions"]);
    let l = v.as_array().unwrap();
    assert_eq!(l.len(), 1, "{v}");
    assert_eq!(l[0]["export"], "g/d");
    assert_eq!(l[0]["writable"], true);
    assert!(env.ok(&["sessions"]).contains("g/d"));
    c.disconnect();
}
