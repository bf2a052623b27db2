//! Where the store's writes go: on PostgreSQL straight to the pool; on
//! SQLite to one connection, with the single-statement writes of many
//! callers committed together (group commit).
//!
//! SQLite appends every page a commit dirtied to its write-ahead log, whole,
//! once per commit. A create wrote four commits (its row, its audit event,
//! two state changes), each rewriting the same few pages at the tail of the
//! sandboxes table, its indexes and the audit table: 60 KiB of log per
//! create, 60 MB/s at 1,000 creates/s, and a log that long has to be
//! started over by a checkpoint that holds the writer (40-50 ms, every
//! second). Committed together, the statements queued while the last
//! commit ran share those pages: 8 KiB of log per create with 32
//! statements a commit (measured on the schema with Python's sqlite3).
//!
//! A caller's answer comes after the commit that holds its statement, so a
//! write that answered is durable as before. Statements are not merged:
//! each runs as it would alone, in arrival order, and a constraint error
//! (a duplicate key, say) fails only its own statement, as SQLite rolls
//! back just that statement. Any other error may have rolled back the
//! whole transaction: that statement's caller gets it and the others of
//! the batch run again in the next one, where their statements are as new.

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, ExecResult,
    QueryResult, RuntimeErr, Statement, TransactionTrait,
};
use tokio::sync::{mpsc, oneshot};

/// The store's writes.
#[derive(Clone, Debug)]
pub(crate) enum Writer {
    /// PostgreSQL: the pool, whose connections commit concurrently.
    Direct(DatabaseConnection),
    /// SQLite: every write goes through the group committer, on the
    /// connection (a pool of one, which the RESTART checkpoints take turns
    /// on too).
    Grouped {
        connection: DatabaseConnection,
        statements: mpsc::Sender<Queued>,
    },
}

/// At most this many statements a commit: a batch holds SQLite's write lock
/// for a few milliseconds at most.
const MAX_BATCH: usize = 256;

/// Callers waiting for a commit at most; more wait to queue.
const QUEUE: usize = 4_096;

impl Writer {
    /// Starts the group committer on `connection` (SQLite): it runs until
    /// the last clone of this writer is dropped.
    pub(crate) fn grouped(connection: DatabaseConnection) -> Self {
        let (statements, queue) = mpsc::channel(QUEUE);
        tokio::spawn(commit_batches(connection.clone(), queue));
        Self::Grouped {
            connection,
            statements,
        }
    }

    fn connection(&self) -> &DatabaseConnection {
        match self {
            Self::Direct(connection) | Self::Grouped { connection, .. } => connection,
        }
    }

    async fn run(&self, call: Call) -> Result<Done, DbErr> {
        let statements = match self {
            Self::Direct(connection) => return call.run(connection).await,
            Self::Grouped { statements, .. } => statements,
        };
        let (reply, answer) = oneshot::channel();
        statements
            .send(Queued { call, reply })
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

fn closed() -> DbErr {
    DbErr::Conn(RuntimeErr::Internal(
        "the store's writer has stopped".into(),
    ))
}

/// One caller's statement and where its answer goes.
pub(crate) struct Queued {
    call: Call,
    reply: oneshot::Sender<Result<Done, DbErr>>,
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queued").finish_non_exhaustive()
    }
}

enum Call {
    Execute(Statement),
    ExecuteUnprepared(String),
    QueryOne(Statement),
    QueryAll(Statement),
}

enum Done {
    Executed(ExecResult),
    One(Option<QueryResult>),
    All(Vec<QueryResult>),
}

impl Call {
    async fn run(&self, on: &impl ConnectionTrait) -> Result<Done, DbErr> {
        Ok(match self {
            Self::Execute(statement) => Done::Executed(on.execute(statement.clone()).await?),
            Self::ExecuteUnprepared(sql) => Done::Executed(on.execute_unprepared(sql).await?),
            Self::QueryOne(statement) => Done::One(on.query_one(statement.clone()).await?),
            Self::QueryAll(statement) => Done::All(on.query_all(statement.clone()).await?),
        })
    }
}

/// The group committer: each batch is what queued while the last one ran.
/// Answers how many transactions it committed once every sender is gone.
async fn commit_batches(connection: DatabaseConnection, mut queue: mpsc::Receiver<Queued>) -> u64 {
    let (mut batch, mut commits) = (Vec::with_capacity(MAX_BATCH), 0);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        while !batch.is_empty() {
            let (committed, rerun) = commit(&connection, std::mem::take(&mut batch)).await;
            commits += u64::from(committed);
            batch = rerun;
        }
    }
    commits
}

/// Runs `batch` in one transaction and answers its callers; answers
/// whether it committed and what must run again (see the module's docs),
/// fewer than `batch` each time.
async fn commit(connection: &DatabaseConnection, batch: Vec<Queued>) -> (bool, Vec<Queued>) {
    let txn = match connection.begin().await {
        Ok(txn) => txn,
        Err(err) => {
            answer_all(batch, &err);
            return (false, Vec::new());
        }
    };
    let mut answers = Vec::with_capacity(batch.len());
    let mut batch = batch.into_iter();
    for queued in batch.by_ref() {
        let result = queued.call.run(&txn).await;
        match result {
            Err(err) if !fails_statement_only(&err) => {
                let _ = queued.reply.send(Err(err));
                return (false, rerun(txn, answers, batch).await);
            }
            result => answers.push((queued, result)),
        }
    }
    match txn.commit().await {
        Ok(()) => {
            for (queued, result) in answers {
                let _ = queued.reply.send(result);
            }
            (true, Vec::new())
        }
        Err(err) => {
            answer_all(answers.into_iter().map(|(queued, _)| queued), &err);
            (false, Vec::new())
        }
    }
}

/// A statement failed in a way that may have rolled back the transaction:
/// everything else of the batch runs again.
async fn rerun(
    txn: DatabaseTransaction,
    ran: Vec<(Queued, Result<Done, DbErr>)>,
    not_run: impl Iterator<Item = Queued>,
) -> Vec<Queued> {
    let _ = txn.rollback().await;
    ran.into_iter()
        .map(|(queued, _)| queued)
        .chain(not_run)
        .collect()
}

fn answer_all(batch: impl IntoIterator<Item = Queued>, err: &DbErr) {
    for queued in batch {
        let _ = queued
            .reply
            .send(Err(DbErr::Conn(RuntimeErr::Internal(format!(
                "not written: {err}"
            )))));
    }
}

/// Whether SQLite undid just the failed statement (a constraint error) and
/// the transaction goes on.
fn fails_statement_only(err: &DbErr) -> bool {
    use sea_orm::sqlx::error::ErrorKind;
    let (DbErr::Exec(RuntimeErr::SqlxError(sea_orm::sqlx::Error::Database(db)))
    | DbErr::Query(RuntimeErr::SqlxError(sea_orm::sqlx::Error::Database(db)))) = err
    else {
        return false;
    };
    matches!(
        db.kind(),
        ErrorKind::UniqueViolation
            | ErrorKind::ForeignKeyViolation
            | ErrorKind::NotNullViolation
            | ErrorKind::CheckViolation
    )
}

fn unexpected() -> DbErr {
    DbErr::Custom("the store's writer answered another kind of call".into())
}

#[async_trait::async_trait]
impl ConnectionTrait for Writer {
    fn get_database_backend(&self) -> DbBackend {
        self.connection().get_database_backend()
    }

    async fn execute(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        match self.run(Call::Execute(stmt)).await? {
            Done::Executed(result) => Ok(result),
            _ => Err(unexpected()),
        }
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        match self.run(Call::ExecuteUnprepared(sql.to_string())).await? {
            Done::Executed(result) => Ok(result),
            _ => Err(unexpected()),
        }
    }

    async fn query_one(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        match self.run(Call::QueryOne(stmt)).await? {
            Done::One(row) => Ok(row),
            _ => Err(unexpected()),
        }
    }

    async fn query_all(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        match self.run(Call::QueryAll(stmt)).await? {
            Done::All(rows) => Ok(rows),
            _ => Err(unexpected()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::{ConnectOptions, Database, Value};

    /// A fresh SQLite file with a table `t`: one connection to it.
    async fn database(dir: &tempfile::TempDir) -> DatabaseConnection {
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("w.db").display());
        let mut options = ConnectOptions::new(url);
        options
            .max_connections(1)
            .min_connections(1)
            .sqlx_logging(false);
        let connection = Database::connect(options).await.expect("connect");
        connection
            .execute_unprepared(
                "PRAGMA journal_mode=WAL; PRAGMA foreign_keys=ON; \
                 CREATE TABLE t (k TEXT PRIMARY KEY); \
                 CREATE TABLE child (p TEXT REFERENCES t(k) DEFERRABLE INITIALLY DEFERRED)",
            )
            .await
            .expect("schema");
        connection
    }

    fn insert(table: &str, k: &str) -> Statement {
        Statement::from_sql_and_values(
            DbBackend::Sqlite,
            format!("INSERT INTO {table} VALUES (?)"),
            [Value::from(k.to_string())],
        )
    }

    /// Queues `statements` as callers would while a commit runs, then lets
    /// the committer take them: each caller's answer and the commits made.
    async fn queued_together(
        connection: &DatabaseConnection,
        statements: Vec<Statement>,
    ) -> (Vec<Result<u64, DbErr>>, u64) {
        let (sender, queue) = mpsc::channel(QUEUE);
        let mut answers = Vec::new();
        for statement in statements {
            let (reply, answer) = oneshot::channel();
            let call = Call::Execute(statement);
            assert!(sender.try_send(Queued { call, reply }).is_ok());
            answers.push(answer);
        }
        drop(sender);
        let commits = commit_batches(connection.clone(), queue).await;
        let mut results = Vec::new();
        for answer in answers {
            results.push(match answer.await.expect("answered") {
                Ok(Done::Executed(done)) => Ok(done.rows_affected()),
                Ok(_) => Err(unexpected()),
                Err(err) => Err(err),
            });
        }
        (results, commits)
    }

    async fn keys(connection: &impl ConnectionTrait) -> Vec<String> {
        connection
            .query_all(Statement::from_string(
                DbBackend::Sqlite,
                "SELECT k FROM t ORDER BY k",
            ))
            .await
            .expect("read")
            .iter()
            .map(|row| row.try_get_by_index::<String>(0).expect("k"))
            .collect()
    }

    fn numbered(count: usize) -> Vec<String> {
        (0..count).map(|i| format!("k-{i:03}")).collect()
    }

    #[tokio::test]
    async fn statements_queued_together_are_committed_together_each_caller_answered() {
        let dir = tempfile::tempdir().expect("temp dir");
        let connection = database(&dir).await;
        let mut statements: Vec<Statement> = numbered(300).iter().map(|k| insert("t", k)).collect();
        statements.push(insert("t", "k-050"));
        let (results, commits) = queued_together(&connection, statements).await;

        assert_eq!(commits, 2, "301 statements in batches of {MAX_BATCH}");
        for (i, result) in results.iter().enumerate().take(300) {
            assert_eq!(result.as_ref().ok(), Some(&1), "statement {i}");
        }
        let duplicate = results[300].as_ref().expect_err("a duplicate key");
        assert!(fails_statement_only(duplicate), "{duplicate}");
        assert_eq!(keys(&connection).await, numbered(300));
    }

    #[tokio::test]
    async fn a_statement_that_may_undo_its_batch_fails_alone_and_the_rest_run_again() {
        let dir = tempfile::tempdir().expect("temp dir");
        let connection = database(&dir).await;
        let mut statements: Vec<Statement> = numbered(20).iter().map(|k| insert("t", k)).collect();
        // Not a constraint error: the committer cannot tell what it undid.
        statements.insert(10, insert("missing", "x"));
        let (results, commits) = queued_together(&connection, statements).await;

        let failed: Vec<usize> = (0..results.len())
            .filter(|i| results[*i].is_err())
            .collect();
        assert_eq!(
            failed,
            vec![10],
            "only the bad statement failed: {results:?}"
        );
        assert_eq!(
            keys(&connection).await,
            numbered(20),
            "the rest written once"
        );
        assert_eq!(commits, 1, "the rest ran again in one commit");
    }

    #[tokio::test]
    async fn a_failed_commit_answers_every_caller_of_the_batch_with_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let connection = database(&dir).await;
        // A deferred foreign key is checked at COMMIT, which then fails.
        let statements = vec![insert("t", "k"), insert("child", "nobody")];
        let (results, commits) = queued_together(&connection, statements).await;

        assert!(results.iter().all(Result::is_err), "{results:?}");
        assert_eq!(commits, 0);
        assert!(keys(&connection).await.is_empty(), "nothing was written");
    }

    #[tokio::test]
    async fn callers_of_the_writer_find_their_writes_committed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let writer = Writer::grouped(database(&dir).await);
        let calls: Vec<_> = numbered(200)
            .into_iter()
            .map(|k| {
                let writer = writer.clone();
                tokio::spawn(async move { writer.execute(insert("t", &k)).await })
            })
            .collect();
        for call in calls {
            let done = call.await.expect("caller").expect("written");
            assert_eq!(done.rows_affected(), 1);
        }
        assert_eq!(keys(&writer).await, numbered(200));
    }
}
