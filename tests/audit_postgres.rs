//! The fleet's trail in PostgreSQL (issue 16, in progress): a relay's SQLite trail is the spool
//! its rows ship from, into a real PostgreSQL server the test starts itself; `audit tail`,
//! `export`, `verify` and `checkpoints` read it there (`--db postgresql://...`).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::postgres::Postgres;
use mcp_tunnel::govern::audit::postgres::{
    Marks, Shipped, SpoolRow, Target, mark_shipped, migrate, ship, ship_spool, unshipped,
};
use mcp_tunnel::govern::audit::{AuditSettings, Auditor, Direction, Outcome, Record, Verdict};

const WAIT: Duration = Duration::from_secs(60);

fn record(tenant: &str, n: u64) -> Record {
    Record {
        time_ms: 1_764_140_400_000 + n,
        tenant: tenant.into(),
        subject: format!("user{}@{tenant}.example", n % 3),
        roles: vec!["analyst".into()],
        source: "db".into(),
        session: None,
        transport: Some("quic".into()),
        protocol_version: Some("2025-11-25".into()),
        direction: Direction::AgentToServer,
        method: "tools/call".into(),
        request_id: Some(format!("{tenant}-{n}")),
        tool: Some(if n.is_multiple_of(3) { "query" } else { "echo" }.into()),
        resource: None,
        prompt: None,
        decision: if n % 4 == 3 {
            Verdict::Deny
        } else {
            Verdict::Allow
        },
        rule: "test rule".into(),
        outcome: Outcome::Ok,
        latency_us: 100,
        bytes_in: 50,
        bytes_out: 70,
        args_sha256: String::new(),
        args: None,
        result: None,
        call: None,
    }
}

/// A closed SQLite trail of `relay` in `dir/relay/` (with its own key, `audit.key`) with
/// `per_tenant` rows for each of two tenants.
async fn spool(dir: &Path, relay: &str, per_tenant: u64) -> std::path::PathBuf {
    let dir = dir.join(relay);
    std::fs::create_dir_all(&dir).expect("the relay's folder");
    let mut config = AuditSettings::new(dir.join(format!("{relay}.db")));
    config.relay_id = Some(relay.into());
    let auditor = Auditor::open(&config).expect("open the trail");
    for n in 0..per_tenant {
        for tenant in ["acme", "globex"] {
            auditor.append(record(tenant, n)).await.expect("append");
        }
    }
    auditor.close().await;
    config.path
}

async fn connect(pg: &Postgres) -> tokio_postgres::Client {
    connect_to(&pg.url()).await
}

async fn connect_to(url: &str) -> tokio_postgres::Client {
    let (client, connection) =
        tokio::time::timeout(WAIT, tokio_postgres::connect(url, tokio_postgres::NoTls))
            .await
            .expect("connects in time")
            .expect("connects");
    tokio::spawn(connection);
    client
}

/// Ships everything the spool at `path` has not shipped, in batches of `batch`.
async fn drain(client: &mut tokio_postgres::Client, path: &Path, batch: usize) -> u64 {
    let conn = rusqlite::Connection::open(path).expect("open the spool");
    let mut shipped = 0;
    loop {
        let (_, rows) = unshipped(&conn, path, batch).expect("read the spool");
        let Some(last) = rows.last().map(|r| r.id) else {
            return shipped;
        };
        shipped += ship(client, "test", &rows).await.expect("ship");
        mark_shipped(&conn, path, last).expect("mark");
    }
}

async fn rows_in(client: &tokio_postgres::Client) -> Vec<(String, String, i64, String)> {
    client
        .query(
            "SELECT relay, tenant, seq, hash FROM records ORDER BY relay, tenant, seq",
            &[],
        )
        .await
        .expect("select")
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// Ships a whole spool, round after round, until a round ships nothing; returns the total.
async fn ship_all(client: &mut tokio_postgres::Client, path: &Path) -> Shipped {
    let conn = rusqlite::Connection::open(path).expect("open the spool");
    let mut marks = Marks::load(&conn, path).expect("the spool's marks");
    let mut total = Shipped::default();
    for _ in 0..100 {
        let round = ship_spool(client, "test", &conn, path, &mut marks)
            .await
            .expect("ship");
        if round == Shipped::default() {
            marks.note(&conn, path, true).expect("note the marks");
            return total;
        }
        total.rows += round.rows;
        total.checkpoints += round.checkpoints;
    }
    panic!("the spool did not drain in 100 rounds");
}

/// `SELECT count(*)` of `table` in the database.
async fn count(client: &tokio_postgres::Client, table: &str) -> u64 {
    let row = client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count");
    row.get::<_, i64>(0) as u64
}

/// `SELECT count(*)` of `table` in the spool at `path`.
fn spool_count(path: &Path, table: &str) -> u64 {
    let conn = rusqlite::Connection::open(path).expect("open the spool");
    conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| {
        r.get::<_, i64>(0)
    })
    .expect("count") as u64
}

#[tokio::test]
async fn a_spool_ships_its_rows_checkpoints_and_keys_once_even_when_shipped_again() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let a = spool(dir.path(), "relay-a", 40).await;
    let mut client = connect(&pg).await;
    migrate(&client, "test").await.expect("schema");
    let checkpoints = spool_count(&a, "checkpoints");
    assert!(checkpoints >= 2, "a start and a close checkpoint at least");
    assert_eq!(
        ship_all(&mut client, &a).await,
        Shipped {
            rows: 80,
            checkpoints
        }
    );
    assert_eq!(count(&client, "records").await, 80);
    assert_eq!(count(&client, "checkpoints").await, checkpoints);
    assert_eq!(count(&client, "keys").await, spool_count(&a, "keys"));
    // Every mark lost (a crash before the spool noted them): all again, nothing new.
    let conn = rusqlite::Connection::open(&a).expect("open the spool");
    conn.execute("DELETE FROM meta WHERE key LIKE 'shipped%'", [])
        .expect("forget the marks");
    assert_eq!(ship_all(&mut client, &a).await, Shipped::default());
    assert_eq!(count(&client, "records").await, 80);
    assert_eq!(count(&client, "checkpoints").await, checkpoints);
}

#[tokio::test]
async fn two_relays_spools_ship_once_each_and_a_forked_row_is_refused() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let a = spool(dir.path(), "relay-a", 20).await;
    let b = spool(dir.path(), "relay-b", 15).await;
    let mut client = connect(&pg).await;
    migrate(&client, "test").await.expect("schema");
    migrate(&client, "test")
        .await
        .expect("schema again: nothing to do");

    assert_eq!(drain(&mut client, &a, 7).await, 40);
    assert_eq!(drain(&mut client, &b, 512).await, 30);
    let stored = rows_in(&client).await;
    assert_eq!(stored.len(), 70, "one row each");
    for (relay, tenant, n) in [("relay-a", "acme", 20), ("relay-b", "globex", 15)] {
        let seqs: Vec<i64> = stored
            .iter()
            .filter(|r| r.0 == relay && r.1 == tenant)
            .map(|r| r.2)
            .collect();
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<i64>>(),
            "{relay} {tenant}: the chain, in order"
        );
    }

    // A crash between the database's commit and the spool's mark: shipped again, stored once.
    let conn = rusqlite::Connection::open(&a).expect("open the spool");
    mark_shipped(&conn, &a, 0).expect("reset the mark");
    assert_eq!(drain(&mut client, &a, 16).await, 0, "nothing new");
    assert_eq!(rows_in(&client).await, stored);

    // The same key with another hash (a forked chain, an altered spool): refused, whole.
    mark_shipped(&conn, &a, 0).expect("reset the mark");
    let (_, rows) = unshipped(&conn, &a, 3).expect("read");
    let mut forked: Vec<SpoolRow> = rows;
    forked[1].hash = "00".repeat(32);
    let error = ship(&mut client, "test", &forked)
        .await
        .expect_err("a forked row is refused");
    let text = error.to_string();
    assert!(
        text.contains("relay relay-a") && text.contains("another hash"),
        "{text}"
    );
    assert_eq!(
        rows_in(&client).await,
        stored,
        "nothing of the batch stored"
    );
}

// ---------------------------------------------------------------------------------------------
// Reading the database's trail: `audit verify|export|tail|checkpoints --db postgresql://...`.

/// The URL of database `db` in the cluster.
fn db_url(pg: &Postgres, db: &str) -> String {
    format!("postgresql://postgres@127.0.0.1:{}/{db}", pg.port)
}

/// Runs `mcp-tunnel ARGS`; returns success and stdout + stderr.
async fn cli(args: &[&str]) -> (bool, String) {
    let output = common::run_cli_within(args, WAIT).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!text.contains("panicked"), "no panic: {text}");
    (output.status.success(), text)
}

/// Runs `mcp-tunnel ARGS`, which must succeed; returns its stdout.
async fn cli_ok(args: &[&str]) -> String {
    let output = common::run_cli_within(args, WAIT).await;
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// Two relays' trails shipped into database `trail` of a cluster of the test's own.
struct Fleet {
    pg: Postgres,
    dir: tempfile::TempDir,
    /// relay-a's spool (20 rows a tenant) and relay-b's (15).
    a: PathBuf,
    b: PathBuf,
}

impl Fleet {
    async fn start() -> Fleet {
        let pg = Postgres::start();
        let dir = tempfile::tempdir().expect("temp dir");
        let a = spool(dir.path(), "relay-a", 20).await;
        let b = spool(dir.path(), "relay-b", 15).await;
        connect(&pg)
            .await
            .batch_execute("CREATE DATABASE trail")
            .await
            .expect("create the database");
        let mut client = connect_to(&db_url(&pg, "trail")).await;
        migrate(&client, "test").await.expect("schema");
        ship_all(&mut client, &a).await;
        ship_all(&mut client, &b).await;
        Fleet { pg, dir, a, b }
    }

    fn url(&self) -> String {
        db_url(&self.pg, "trail")
    }

    /// A copy of the shipped trail as database `name`, changed by `sql`; returns its URL.
    async fn tampered(&self, name: &str, sql: &str) -> String {
        let admin = connect(&self.pg).await;
        let create = format!("CREATE DATABASE {name} TEMPLATE trail");
        // The template must have no session: the shipping one may take a moment to end.
        let mut tries = 0;
        while let Err(e) = admin.batch_execute(&create).await {
            tries += 1;
            assert!(tries < 100, "copy the trail: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let url = db_url(&self.pg, name);
        connect_to(&url)
            .await
            .batch_execute(sql)
            .await
            .expect("tamper");
        url
    }

    fn key(&self, relay: &str) -> PathBuf {
        self.dir.path().join(relay).join("audit.key.pub")
    }
}

async fn verify_pg(url: &str, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["audit", "verify", "--db", url];
    args.extend_from_slice(extra);
    cli(&args).await
}

#[tokio::test]
async fn verify_over_postgres_passes_for_two_relays_then_names_each_kind_of_tampering() {
    let fleet = Fleet::start().await;
    let url = fleet.url();
    let checkpoints = spool_count(&fleet.a, "checkpoints") + spool_count(&fleet.b, "checkpoints");

    let (ok, out) = verify_pg(&url, &[]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "ok: 70 rows, 2 tenants, {checkpoints} checkpoints of 2 relays verified"
        )),
        "{out}"
    );
    // One key a relay: both given, it passes; one missing, the other relay's checkpoints fail.
    let (key_a, key_b) = (fleet.key("relay-a"), fleet.key("relay-b"));
    let (key_a, key_b) = (
        key_a.to_str().expect("UTF-8"),
        key_b.to_str().expect("UTF-8"),
    );
    let (ok, out) = verify_pg(&url, &["--public-key", key_a, "--public-key", key_b]).await;
    assert!(ok, "{out}");
    let (ok, out) = verify_pg(&url, &["--public-key", key_a]).await;
    assert!(
        !ok && out.contains("relay \"relay-b\" checkpoint 1") && out.contains("unknown key"),
        "{out}"
    );

    // `audit checkpoints --export` is the relays' checkpoints, relay by relay, as each spool
    // has them; and it is an off-box copy verify accepts.
    let exported = cli_ok(&["audit", "checkpoints", "--export", "--db", &url]).await;
    let mut expected = String::new();
    for spool in [&fleet.a, &fleet.b] {
        expected += &cli_ok(&[
            "audit",
            "checkpoints",
            "--export",
            "--db",
            spool.to_str().expect("UTF-8"),
        ])
        .await;
    }
    assert_eq!(exported, expected);
    let human = cli_ok(&["audit", "checkpoints", "--db", &url]).await;
    assert_eq!(human.lines().count() as u64, checkpoints, "{human}");
    let copy = fleet.dir.path().join("copy.jsonl");
    std::fs::write(&copy, &exported).expect("write the copy");
    let (ok, out) = verify_pg(&url, &["--checkpoints", copy.to_str().expect("UTF-8")]).await;
    assert!(
        ok && out.contains(&format!("{checkpoints} checkpoints match the off-box copy")),
        "{out}"
    );

    assert_tampered_databases_fail(&fleet).await;
}

/// Copies of the shipped trail, each changed in one way, fail verify naming the relay and the
/// row (tenant and seq) or checkpoint.
async fn assert_tampered_databases_fail(fleet: &Fleet) {
    let row = "relay = 'relay-a' AND tenant = 'acme'";
    let swap = format!(
        "UPDATE records SET spool_id = CASE seq \
           WHEN 3 THEN (SELECT spool_id FROM records WHERE {row} AND seq = 4) \
           ELSE (SELECT spool_id FROM records WHERE {row} AND seq = 3) END \
         WHERE {row} AND seq IN (3, 4);"
    );
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "record",
            "UPDATE records SET record = convert_to(replace(convert_from(record, 'UTF8'), \
             'test rule', 'tset rule'), 'UTF8') \
             WHERE relay = 'relay-b' AND tenant = 'globex' AND seq = 11;",
            &[
                "relay \"relay-b\" tenant \"globex\" seq 11",
                "hash mismatch",
            ],
        ),
        (
            "subject",
            "UPDATE records SET subject = 'mallory' \
             WHERE relay = 'relay-a' AND tenant = 'acme' AND seq = 7;",
            &[
                "relay \"relay-a\" tenant \"acme\" seq 7",
                "column mismatch",
                "column subject is \"mallory\"",
            ],
        ),
        (
            "decision",
            "UPDATE records SET decision = 'allow' \
             WHERE relay = 'relay-b' AND tenant = 'acme' AND seq = 4;",
            &[
                "relay \"relay-b\" tenant \"acme\" seq 4",
                "column decision is \"allow\"",
            ],
        ),
        (
            "deleted",
            "DELETE FROM records WHERE relay = 'relay-b' AND tenant = 'globex' AND seq = 5;",
            &[
                "relay \"relay-b\" tenant \"globex\" seq 6",
                "gap",
                "seq 5 is missing",
            ],
        ),
        (
            "swapped",
            &swap,
            &["relay \"relay-a\" tenant \"acme\" seq 4", "reordered"],
        ),
        (
            "checkpoint",
            "DELETE FROM checkpoints WHERE relay = 'relay-b' AND n = 1;",
            &[
                "relay \"relay-b\" checkpoint 2",
                "checkpoint gap",
                "checkpoint 1 is missing",
            ],
        ),
        (
            "tenant",
            "DELETE FROM records WHERE relay = 'relay-b' AND tenant = 'acme';",
            &[
                "relay \"relay-b\"",
                "tenant \"acme\" seq 15",
                "tenant vanished",
            ],
        ),
    ];
    for (name, sql, expected) in cases {
        let url = fleet.tampered(name, sql).await;
        let (ok, out) = verify_pg(&url, &[]).await;
        println!("{name}:\n{out}");
        assert!(!ok, "{name}: verify must fail\n{out}");
        for needle in *expected {
            assert!(
                out.contains(needle),
                "{name}: expected {needle:?} in\n{out}"
            );
        }
    }
    // The row is named by its id in the database, not the mirror's.
    let client = connect_to(&db_url(&fleet.pg, "subject")).await;
    let id: i64 = client
        .query_one(
            "SELECT id FROM records WHERE relay = 'relay-a' AND tenant = 'acme' AND seq = 7",
            &[],
        )
        .await
        .expect("the row")
        .get(0);
    let (_, out) = verify_pg(&db_url(&fleet.pg, "subject"), &[]).await;
    assert!(out.contains(&format!("(row id {id})")), "{out}");
}

/// `audit export ARGS` of `db`'s lines.
async fn export_lines(db: &str, filters: &[&str]) -> Vec<String> {
    let mut args = vec!["audit", "export", "--db", db];
    args.extend_from_slice(filters);
    cli_ok(&args).await.lines().map(str::to_owned).collect()
}

#[tokio::test]
async fn export_and_tail_over_postgres_print_what_the_sqlite_readers_print_filter_by_filter() {
    let fleet = Fleet::start().await;
    let url = fleet.url();
    let (a, b) = (
        fleet.a.to_str().expect("UTF-8"),
        fleet.b.to_str().expect("UTF-8"),
    );
    let everything = export_lines(&url, &[]).await;
    assert_eq!(everything.len(), 70);
    let since = (1_764_140_400_000u64 + 5).to_string();
    let until = (1_764_140_400_000u64 + 10).to_string();
    let filters: &[&[&str]] = &[
        &["--tenant", "acme"],
        &["--tool", "query"],
        &["--decision", "deny"],
        &["--subject", "user1@globex.example", "--source", "db"],
        &["--since", &since, "--until", &until],
        &[
            "--tenant",
            "globex",
            "--decision",
            "allow",
            "--tool",
            "echo",
        ],
    ];
    for filter in filters {
        // Shipped relay-a first, then relay-b: the database's order is theirs, one after the
        // other, and the lines are the spools' own.
        let mut want = export_lines(a, filter).await;
        want.extend(export_lines(b, filter).await);
        assert!(
            !want.is_empty() && want.len() < 70,
            "{filter:?} selects some rows"
        );
        assert_eq!(export_lines(&url, filter).await, want, "{filter:?}");
    }
    // Counted from the records themselves: records 5 to 9 of two tenants of two relays.
    assert_eq!(
        export_lines(&url, &["--since", &since, "--until", &until])
            .await
            .len(),
        20
    );
    assert_eq!(
        export_lines(&url, &["--relay", "relay-b"]).await,
        export_lines(b, &[]).await
    );
    assert_eq!(
        export_lines(a, &["--relay", "relay-a", "--tenant", "acme"])
            .await
            .len(),
        20,
        "--relay on a SQLite trail"
    );
    assert!(export_lines(&url, &["--relay", "relay-c"]).await.is_empty());

    // tail -n: the latest rows, as the spool's tail prints them.
    let tail = |db: String, extra: &'static [&'static str]| async move {
        let mut args = vec!["audit", "tail", "-n", "3", "--tenant", "acme", "--db", &db];
        args.extend_from_slice(extra);
        cli_ok(&args).await
    };
    let got = tail(url.clone(), &["--relay", "relay-a"]).await;
    assert_eq!(got.lines().count(), 3, "{got}");
    assert!(
        got.lines().last().is_some_and(|l| l.contains(" acme#20 ")),
        "{got}"
    );
    assert_eq!(got, tail(a.to_owned(), &[]).await);
    assert_eq!(
        tail(url.clone(), &["--decision", "deny"]).await,
        tail(b.to_owned(), &["--decision", "deny"]).await,
        "relay-b's rows are the latest"
    );

    // A larger trail streams out whole, in order.
    connect_to(&url)
        .await
        .batch_execute(
            "INSERT INTO records (relay, tenant, seq, spool_id, prev_hash, hash, time_ms, \
             subject, source, tool, decision, record) \
             SELECT 'bulk', 'acme', g, g, '', '', g, 's', 'db', 'query', 'allow', \
             convert_to(json_build_object('n', g)::text, 'UTF8') \
             FROM generate_series(1, 20000) AS g",
        )
        .await
        .expect("bulk rows");
    let bulk = export_lines(&url, &["--relay", "bulk"]).await;
    assert_eq!(bulk.len(), 20_000);
    for (i, line) in bulk.iter().enumerate() {
        let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        assert_eq!(value["n"], i as u64 + 1, "in order");
        assert_eq!(value["seq"], i as u64 + 1);
    }
    assert_eq!(export_lines(&url, &[]).await.len(), 20_070);
}

#[tokio::test]
async fn tail_follow_over_postgres_prints_rows_shipped_after_it_started_even_out_of_order() {
    let fleet = Fleet::start().await;
    let url = fleet.url();
    let mut follow = common::audit::Follow::start(&url);
    let first = follow.next_line().await;
    assert!(
        first.contains(" acme#15 "),
        "relay-b's last acme row: {first}"
    );

    // A third relay ships: its acme rows follow, in order, not globex's.
    let c = spool(fleet.dir.path(), "relay-c", 3).await;
    let mut client = connect_to(&url).await;
    ship_all(&mut client, &c).await;
    for seq in 1..=3 {
        let line = follow.next_line().await;
        assert!(line.contains(&format!(" acme#{seq} ")), "{line}");
    }

    // Two relays' transactions commit in the other order than their ids: the row with the
    // lower id, committed later, is printed too.
    let row = |relay: &str, n: u64| {
        let bytes = serde_json::to_vec(&record("acme", n)).expect("JSON");
        (relay.to_owned(), bytes, n as i64)
    };
    let insert = "INSERT INTO records (relay, tenant, seq, spool_id, prev_hash, hash, time_ms, \
                  subject, source, tool, decision, record) \
                  VALUES ($1, 'acme', $3, $3, '', '', 0, 's', 'db', 'query', 'allow', $2)";
    let mut slow = connect_to(&url).await;
    let tx = slow.transaction().await.expect("begin");
    let (relay, bytes, seq) = row("relay-slow", 101);
    tx.execute(insert, &[&relay, &bytes, &seq])
        .await
        .expect("the lower id, uncommitted");
    let (relay, bytes, seq) = row("relay-fast", 102);
    client
        .execute(insert, &[&relay, &bytes, &seq])
        .await
        .expect("the higher id, committed");
    let line = follow.next_line().await;
    assert!(line.contains(" acme#102 "), "{line}");
    tx.commit().await.expect("commit the lower id");
    let line = follow.next_line().await;
    assert!(line.contains(" acme#101 "), "{line}");

    follow.stop().await;
}

#[tokio::test]
async fn a_database_that_is_not_a_trail_or_not_there_is_a_clear_error() {
    let pg = Postgres::start();
    let admin = connect(&pg).await;
    for db in ["empty", "unversioned", "future"] {
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .expect("create the database");
    }
    connect_to(&db_url(&pg, "unversioned"))
        .await
        .batch_execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        .await
        .expect("a meta table without a version");
    connect_to(&db_url(&pg, "future"))
        .await
        .batch_execute(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL); \
             INSERT INTO meta VALUES ('schema', '99')",
        )
        .await
        .expect("a later schema");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("no-such-password");
    let cases: Vec<(String, Vec<String>, &str)> = vec![
        (
            db_url(&pg, "empty"),
            vec![],
            "not an audit trail (no meta table",
        ),
        (
            db_url(&pg, "unversioned"),
            vec![],
            "not an audit trail (no schema version",
        ),
        (db_url(&pg, "future"), vec![], "schema version 99"),
        (
            format!("postgresql://postgres@127.0.0.1:{closed}/postgres"),
            vec![],
            "Connection refused",
        ),
        (
            "postgresql://postgres@127.0.0.1:notaport/postgres".into(),
            vec![],
            "audit trail the audit database url: invalid connection string",
        ),
        (
            db_url(&pg, "empty"),
            vec![
                "--password-file".into(),
                missing.to_str().expect("UTF-8").into(),
            ],
            "password file",
        ),
        (
            "mysql://root@127.0.0.1/trail".into(),
            vec![],
            "mysql:// is not a trail",
        ),
        (
            // Named generically (the URL's text may hold the password), with the cause.
            "postgresql://postgres:s3cret@127.0.0.1:notaport/postgres".into(),
            vec![],
            "the audit database url: invalid connection string: invalid value for option `port`",
        ),
    ];
    for (db, extra, expected) in &cases {
        for command in [
            &["audit", "verify"][..],
            &["audit", "export"],
            &["audit", "tail"],
            &["audit", "checkpoints"],
        ] {
            let mut args: Vec<&str> = command.to_vec();
            args.extend(["--db", db]);
            args.extend(extra.iter().map(String::as_str));
            let (ok, out) = cli(&args).await;
            assert!(!ok, "{args:?} must fail: {out}");
            assert!(
                out.contains(expected),
                "{args:?}: expected {expected:?} in {out}"
            );
            assert!(!out.contains("s3cret"), "never the password: {out}");
        }
    }
}

/// The least-privilege role the README gives relays: `SELECT` and `INSERT`, nothing else.
const RELAY_ROLE: &str = "CREATE ROLE relay_writer LOGIN; \
    GRANT SELECT ON meta TO relay_writer; \
    GRANT SELECT, INSERT ON records, checkpoints, keys TO relay_writer;";

#[tokio::test]
async fn a_relay_ships_with_select_and_insert_only_and_cannot_erase_the_trail() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().expect("temp dir");
    // The schema made once by the database's owner.
    let owner = connect(&pg).await;
    migrate(&owner, "owner")
        .await
        .expect("the owner makes the schema");
    owner
        .batch_execute(RELAY_ROLE)
        .await
        .expect("the relay's role");

    let url = format!("postgresql://relay_writer@127.0.0.1:{}/postgres", pg.port);
    let target = Target::new(&url, None).expect("a valid URL");
    let mut relay = target.connect().await.expect("connects as relay_writer");
    migrate(&relay, target.name())
        .await
        .expect("a relay only reads the schema's version");
    let path = spool(dir.path(), "relay-a", 10).await;
    let shipped = ship_all(&mut relay, &path).await;
    assert_eq!(shipped.rows, 20);
    assert!(shipped.checkpoints >= 2, "{shipped:?}");

    for erase in [
        "DELETE FROM records",
        "UPDATE records SET subject = 'x'",
        "TRUNCATE records",
        "DELETE FROM checkpoints",
        "DROP TABLE records",
    ] {
        let err = relay
            .batch_execute(erase)
            .await
            .expect_err("a relay cannot change or erase the trail");
        let text = format!("{err:?}");
        assert!(
            text.contains("permission denied") || text.contains("must be owner"),
            "{erase}: {text}"
        );
    }
    assert_eq!(count(&owner, "records").await, 20);
}
