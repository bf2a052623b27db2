//! The store on both databases: migrations run (and roll back and run
//! again), secrets are stored hashed and authenticate, lookups are scoped to
//! the org, sandbox rows round-trip, listing pages and filters, and ledger
//! entries are idempotent with the balance equal to their sum.
//!
//! PostgreSQL runs when CORRAL_TEST_POSTGRES_URL is set (scripts/test starts
//! one); in CI its absence is a failure, not a skip.

use std::collections::BTreeMap;

use corral_actors::domain::SandboxState;
use corral_actors::store::{sandbox, NewLedgerEntry, SandboxFilter, Store};
use corral_actors::CorralError;
use corral_migrations::{Migrator, MigratorTrait};
use sea_orm::{ConnectionTrait, TransactionTrait};
use serde_json::json;

async fn sqlite_store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("corral.db").display()
    );
    (Store::connect(&url).await.expect("sqlite store"), dir)
}

/// A fresh database on the test PostgreSQL server, or None (skipped outside CI).
async fn postgres_store() -> Option<Store> {
    let Ok(base) = std::env::var("CORRAL_TEST_POSTGRES_URL") else {
        assert!(
            !corral_tests::required(),
            "CORRAL_TEST_POSTGRES_URL is not set: CI must run the store tests on PostgreSQL"
        );
        eprintln!("SKIPPED: CORRAL_TEST_POSTGRES_URL is not set; PostgreSQL store tests not run");
        return None;
    };
    let url = corral_tests::fresh_postgres_database(&base)
        .await
        .expect("a fresh test database");
    Some(Store::connect(&url).await.expect("postgres store"))
}

fn sandbox_row(org_id: &str, labels: serde_json::Value) -> sandbox::Model {
    sandbox::Model {
        name: Some("web".into()),
        command: json!(["sleep", "10"]),
        env: json!({"A": "1"}),
        labels,
        cpu_millis: 500,
        ttl_seconds: Some(60),
        ..sandbox::Model::for_test(org_id, "hst_x", SandboxState::Scheduled)
    }
}

async fn migrations_roll_back_and_forward(store: &Store) {
    let db = store.connection();
    Migrator::down(db, None).await.expect("down");
    assert!(
        store.list_orgs().await.is_err(),
        "tables are gone after down"
    );
    Migrator::up(db, None).await.expect("up again");
    assert!(store.list_orgs().await.expect("orgs").is_empty());
}

async fn credentials_are_hashed_and_scoped(store: &Store) {
    let org = store.create_org("acme").await.expect("org");
    let other = store.create_org("globex").await.expect("org");
    assert!(matches!(
        store.create_org("acme").await,
        Err(CorralError::Conflict(_))
    ));

    let key = store.create_api_key(&org.id, "ci").await.expect("key");
    assert_ne!(
        key.record.secret_hash, key.secret,
        "the secret is not stored"
    );
    assert!(!key.record.secret_hash.contains(&key.secret[3..]));
    let found = store.authenticate_api_key(&key.secret).await.expect("auth");
    assert_eq!(found.map(|k| k.org_id), Some(org.id.clone()));
    assert!(store
        .authenticate_api_key("ck_wrong")
        .await
        .expect("auth")
        .is_none());

    // Another org cannot revoke it; its owner can, and then it is dead.
    assert!(matches!(
        store.revoke_api_key(&other.id, &key.record.id).await,
        Err(CorralError::NotFound(_))
    ));
    store
        .revoke_api_key(&org.id, &key.record.id)
        .await
        .expect("revoke");
    assert!(store
        .authenticate_api_key(&key.secret)
        .await
        .expect("auth")
        .is_none());

    let token = store.create_host_token("h1", None).await.expect("token");
    let found = store
        .authenticate_host_token(&token.secret)
        .await
        .expect("auth");
    assert_eq!(found.map(|t| t.host_id), Some(token.record.host_id.clone()));
    store
        .revoke_host_token(&token.record.id)
        .await
        .expect("revoke");
    assert!(store
        .authenticate_host_token(&token.secret)
        .await
        .expect("auth")
        .is_none());
}

async fn sandboxes_round_trip_and_list(store: &Store) {
    let org = store.create_org("sandboxes").await.expect("org");
    let other = store.create_org("other").await.expect("org");
    let mut ids = Vec::new();
    for i in 0..5 {
        let labels = json!({"team": if i % 2 == 0 { "a" } else { "b" }});
        let row = store
            .insert_sandbox(sandbox_row(&org.id, labels))
            .await
            .expect("insert");
        ids.push(row.id);
    }
    store
        .insert_sandbox(sandbox_row(&other.id, json!({})))
        .await
        .expect("insert");

    let mut row = store
        .get_sandbox(&org.id, &ids[0])
        .await
        .expect("get")
        .expect("row");
    assert_eq!(row.env, json!({"A": "1"}));
    row.state = SandboxState::Running.as_str().into();
    row.exit_code = Some(3);
    store.save_sandbox(row).await.expect("save");
    let row = store
        .get_sandbox(&org.id, &ids[0])
        .await
        .expect("get")
        .expect("row");
    assert_eq!((row.state.as_str(), row.exit_code), ("running", Some(3)));
    assert!(store
        .get_sandbox(&other.id, &ids[0])
        .await
        .expect("get")
        .is_none());

    // Pages of two, in creation order, never showing the other org's.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_sandboxes(
                &org.id,
                &SandboxFilter {
                    limit: 2,
                    after: after.clone(),
                    ..Default::default()
                },
            )
            .await
            .expect("list");
        if page.is_empty() {
            break;
        }
        after = page.last().map(|r| r.id.clone());
        seen.extend(page.into_iter().map(|r| r.id));
    }
    assert_eq!(seen, ids);

    let team_a = store
        .list_sandboxes(
            &org.id,
            &SandboxFilter {
                limit: 100,
                labels: BTreeMap::from([("team".into(), "a".into())]),
                ..Default::default()
            },
        )
        .await
        .expect("list");
    assert_eq!(team_a.len(), 3);
    let running = store
        .list_sandboxes(
            &org.id,
            &SandboxFilter {
                limit: 100,
                state: Some(SandboxState::Running),
                ..Default::default()
            },
        )
        .await
        .expect("list");
    assert_eq!(running.len(), 1);
}

async fn ledger_is_idempotent(store: &Store) {
    let org = store.create_org("ledger").await.expect("org");
    let entry = |key: &str, amount: i64| NewLedgerEntry {
        org_id: org.id.clone(),
        kind: "deposit".into(),
        amount_micros: amount,
        idempotency_key: key.into(),
        sandbox_id: None,
        description: String::new(),
        period_start: None,
        period_end: None,
        carry: None,
    };
    let (_, inserted) = store
        .append_ledger_entry(entry("k1", 5_000_000))
        .await
        .expect("append");
    assert!(inserted);
    let (again, inserted) = store
        .append_ledger_entry(entry("k1", 5_000_000))
        .await
        .expect("append");
    assert!(!inserted, "a retried entry is not applied twice");
    assert_eq!(again.amount_micros, 5_000_000);
    store
        .append_ledger_entry(entry("k2", -1_250))
        .await
        .expect("append");
    assert_eq!(
        store.ledger_balance(&org.id).await.expect("balance"),
        4_998_750
    );
    let entries = store
        .list_ledger_entries(&org.id, None, 10)
        .await
        .expect("entries");
    assert_eq!(
        entries.iter().map(|e| e.amount_micros).sum::<i64>(),
        4_998_750
    );

    // A batch (a billing tick) larger than one statement: new keys are
    // inserted, a key already written is skipped, and a key given twice is
    // inserted once, for its first occurrence.
    let mut batch: Vec<NewLedgerEntry> = (0..1_203)
        .map(|i| entry(&format!("tick-{i}"), -1))
        .collect();
    batch.insert(600, entry("k1", -7));
    batch.push(entry("tick-5", -1));
    let appended = store.append_ledger_entries(batch).await;
    assert_eq!(appended.failed, None);
    let inserted = appended.inserted;
    assert_eq!(inserted.len(), 1_205);
    assert_eq!(inserted.iter().filter(|new| **new).count(), 1_203);
    assert!(!inserted[600], "k1 was written before");
    assert!(!inserted[1_204], "tick-5 came earlier in the batch");
    assert!(inserted[5] && inserted[601] && inserted[1_203]);
    assert_eq!(
        store.ledger_balance(&org.id).await.expect("balance"),
        4_998_750 - 1_203
    );
    // The same batch again writes nothing.
    let again = store
        .append_ledger_entries(
            (0..1_203)
                .map(|i| entry(&format!("tick-{i}"), -1))
                .collect(),
        )
        .await;
    assert_eq!(again.failed, None);
    assert_eq!(again.inserted.len(), 1_203);
    assert!(again.inserted.iter().all(|new| !new));
}

async fn full_suite(store: &Store) {
    credentials_are_hashed_and_scoped(store).await;
    sandboxes_round_trip_and_list(store).await;
    ledger_is_idempotent(store).await;
    migrations_roll_back_and_forward(store).await;
}

#[tokio::test]
async fn store_works_on_sqlite() {
    let (store, _dir) = sqlite_store().await;
    full_suite(&store).await;
}

#[tokio::test]
async fn store_works_on_postgres() {
    if let Some(store) = postgres_store().await {
        full_suite(&store).await;
    }
}

#[tokio::test]
async fn sqlite_runs_in_wal_mode() {
    let (store, _dir) = sqlite_store().await;
    let row = store
        .connection()
        .query_one(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Sqlite,
            "PRAGMA journal_mode",
        ))
        .await
        .expect("pragma")
        .expect("a row");
    let mode: String = row.try_get_by_index(0).expect("mode");
    assert_eq!(mode.to_lowercase(), "wal");

    // `synchronous` is per connection: every pooled connection must have it,
    // not only the first. Hold several transactions open at once so the pool
    // has to hand out distinct connections.
    let mut open = Vec::new();
    for _ in 0..4 {
        let txn = store.connection().begin().await.expect("begin");
        let row = txn
            .query_one(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Sqlite,
                "PRAGMA synchronous",
            ))
            .await
            .expect("pragma")
            .expect("a row");
        let level: i64 = row.try_get_by_index(0).expect("level");
        assert_eq!(level, 1, "synchronous=NORMAL on every connection");
        open.push(txn);
    }
}

/// SQLite's own checkpoint is off (a commit that crossed its threshold
/// synced the database file inside a request); the store's background task
/// must move committed pages into the database file while it runs, or the
/// WAL grows for as long as the process lives. The database file alone (a
/// copy without the WAL) shows what was checkpointed.
#[tokio::test]
async fn sqlite_commits_reach_the_database_file_while_the_store_runs() {
    let (store, dir) = sqlite_store().await;
    let org = store.create_org("checkpointed").await.expect("org");
    let copies = tempfile::tempdir().expect("temp dir");
    let mut attempt = 0;
    corral_tests::wait_for(
        "the org's row in the database file",
        std::time::Duration::from_secs(10),
        || {
            attempt += 1;
            let copy = copies.path().join(format!("copy-{attempt}.db"));
            let copied = std::fs::copy(dir.path().join("corral.db"), &copy);
            let org_id = org.id.clone();
            async move {
                copied.ok()?;
                // A copy taken mid-checkpoint may be torn: not yet.
                let db = sea_orm::Database::connect(format!("sqlite://{}", copy.display()))
                    .await
                    .ok()?;
                let row = db
                    .query_one(sea_orm::Statement::from_sql_and_values(
                        sea_orm::DbBackend::Sqlite,
                        "SELECT COUNT(*) FROM orgs WHERE id = ?",
                        [org_id.into()],
                    ))
                    .await
                    .ok()??;
                let found: i64 = row.try_get_by_index(0).ok()?;
                let _ = db.close().await;
                (found == 1).then_some(())
            }
        },
    )
    .await;
    // The store still runs: nothing closed its connections meanwhile.
    store.ping().await.expect("the store is still up");
}

/// A tick's entries go in several statements, each written whole or not at
/// all; when one fails, the answer says exactly which entries were
/// committed (the ledger applies those and charges the rest again under the
/// same keys), and nothing past the failed statement was written. A trigger refuses one key, as a database that
/// fails mid-write would.
#[tokio::test]
async fn a_failed_statement_leaves_the_committed_part() {
    let (store, _dir) = sqlite_store().await;
    let org = store.create_org("partial").await.expect("org");
    store
        .connection()
        .execute_unprepared(
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON ledger_entries \
             WHEN NEW.idempotency_key = 'poison' \
             BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        .await
        .expect("trigger");
    let per = Store::ENTRIES_PER_STATEMENT;
    let entry = |key: String| NewLedgerEntry {
        org_id: org.id.clone(),
        kind: "usage".into(),
        amount_micros: -1,
        idempotency_key: key,
        sandbox_id: None,
        description: String::new(),
        period_start: None,
        period_end: None,
        carry: None,
    };
    // Three statements' worth; the poison is in the second.
    let mut batch: Vec<NewLedgerEntry> = (0..3 * per).map(|i| entry(format!("e-{i}"))).collect();
    batch[per + 7] = entry("poison".into());
    let appended = store.append_ledger_entries(batch).await;
    assert!(appended.failed.is_some(), "the second statement failed");
    assert_eq!(appended.inserted.len(), per, "only the first was committed");
    assert!(appended.inserted.iter().all(|new| *new));
    assert_eq!(
        store.ledger_balance(&org.id).await.expect("balance"),
        -(per as i64),
        "nothing of the failed or later statements was written"
    );

    // The rest again (as the next tick would), without the poison: the
    // committed part is skipped, the rest written once.
    let retry: Vec<NewLedgerEntry> = (0..3 * per).map(|i| entry(format!("e-{i}"))).collect();
    let appended = store.append_ledger_entries(retry).await;
    assert_eq!(appended.failed, None);
    assert_eq!(appended.inserted.len(), 3 * per);
    assert_eq!(
        appended.inserted.iter().filter(|new| **new).count(),
        2 * per
    );
    assert_eq!(
        store.ledger_balance(&org.id).await.expect("balance"),
        -(3 * per as i64)
    );
}
