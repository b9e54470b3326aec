//! The fleet's trail in PostgreSQL (issue 16, in progress): a relay's SQLite trail is the spool
//! its rows ship from, into a real PostgreSQL server the test starts itself.

mod common;

use std::path::Path;
use std::time::Duration;

use common::postgres::Postgres;
use mcp_tunnel::govern::audit::postgres::{
    Shipped, SpoolRow, mark_shipped, migrate, ship, ship_spool, unshipped,
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
        tool: Some("query".into()),
        resource: None,
        prompt: None,
        decision: Verdict::Allow,
        rule: "test rule".into(),
        outcome: Outcome::Ok,
        latency_us: 100,
        bytes_in: 50,
        bytes_out: 70,
        args_sha256: String::new(),
        args: None,
        result: None,
    }
}

/// A closed SQLite trail of `relay` in `dir` with `per_tenant` rows for each of two tenants.
async fn spool(dir: &Path, relay: &str, per_tenant: u64) -> std::path::PathBuf {
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
    let (client, connection) = tokio::time::timeout(
        WAIT,
        tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls),
    )
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
    let mut total = Shipped::default();
    for _ in 0..100 {
        let round = ship_spool(client, "test", &conn, path).await.expect("ship");
        if round == Shipped::default() {
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
