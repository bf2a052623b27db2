//! Persistence: the SeaORM connection (SQLite file in WAL mode by default,
//! PostgreSQL when the URL says so), migrations at start-up, and the typed
//! queries the actors and the API use. Nothing outside this module builds SQL.
//!
//! Secrets (API keys, host tokens) are generated here, returned once, and only
//! their SHA-256 is stored: they are 256-bit random values, so a plain hash
//! is enough to make the table useless to a thief and keeps look-ups O(1).

pub mod entities;
mod security;
mod writer;

pub use security::{AuditFilter, NewAuditEvent};

use std::collections::BTreeMap;

use std::sync::Arc;

use chrono::Utc;
use corral_migrations::{Migrator, MigratorTrait};
use sea_orm::sea_query::{Alias, Expr, Func};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseConnection,
    DbBackend, EntityTrait, IntoActiveModel, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
    Set, SqlErr,
};
use sha2::{Digest, Sha256};

use crate::domain::{new_id, BillingStatus, HostAdminState, HostState, SandboxState};
use crate::error::{CorralError, Result};
pub use entities::{
    api_key, audit_event, billing_event, host, host_token, ledger_entry, org, price_plan, sandbox,
};

/// A handle on the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    /// Reads (and PostgreSQL's writes): a pool.
    db: DatabaseConnection,
    /// Writes. On SQLite one connection: SQLite has one write lock, and a
    /// writer that finds it taken sleeps in its busy handler (1, 2, 5,
    /// 10 ... 100 ms) and may lose it again on waking; queued here instead,
    /// writers take turns in arrival order without sleeping (CPU per create
    /// 1.8 -> 1.35 ms in the throughput benchmark), and the statements that
    /// queued meanwhile are committed together (see [`writer`]). On
    /// PostgreSQL, `db` again.
    writer: writer::Writer,
    /// Seals sandbox secret env values; `None` when no secret key is
    /// configured (then creates with secrets are refused).
    secrets: Option<crate::secrets::SecretBox>,
    /// SQLite's WAL checkpoints, run in the background for as long as a
    /// clone of this store lives (see [`Checkpoints`]).
    _checkpoints: Option<Arc<Checkpoints>>,
}

/// Checkpoints an SQLite write-ahead log every second from a task of its
/// own, on a connection of its own.
///
/// SQLite's automatic checkpoint runs inside whichever commit crosses 1,000
/// pages and syncs the database file there: after a billing tick wrote
/// thousands of entries, some create's one-row commit paid for it
/// (half-rate p99 224-433 ms; 36-50 ms without), so connections are opened
/// with `wal_autocheckpoint=0`. A passive checkpoint alone is not enough:
/// under a steady stream of commits it never catches up with the end of the
/// log, the log never starts over, and it grew by 60 MB/s to 3.6 GB in a
/// minute of creates. So once a passive checkpoint reports a log longer
/// than [`Checkpoints::RESTART_ABOVE_FRAMES`], a RESTART follows it at
/// once: it copies the rest of the log into the database file and makes the
/// next commit write from its start again, unless a reader still reads the
/// old log (it waits [`Checkpoints::RESTART_WAIT`] for it, then leaves it
/// to the next second). Right behind the passive one it has only what was
/// committed meanwhile to copy (7-9 ms holding the writer at 2,300 creates/s; a
/// RESTART a second after the last passive one copied a whole second of
/// log: 50-60 ms).
///
/// A passive checkpoint runs beside writers (SQLite's checkpoint lock is
/// not its write lock), so it has a connection of its own: on the writer
/// connection each one took a writer's turn, and while a billing tick's
/// thousands of entries grew the log, copying a second's worth of it into
/// the database file took 200-300 ms, every second, with every create's
/// commit queued behind it (half-rate p99 285 ms, all of it in these
/// stalls). A RESTART does block writers while it waits for the log to be
/// free, so it runs on the writer connection and takes a writer's turn:
/// writers queue behind it in this process instead of sleeping in SQLite's
/// busy handler; it waits only for readers to leave the old snapshot,
/// which are short. A busy
/// answer is harmless: the next second tries again. Stops when the last
/// store is dropped.
#[derive(Debug)]
struct Checkpoints(tokio::task::AbortHandle);

impl Checkpoints {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(1);
    /// A log longer than this is started over: 16 MiB of 1 KiB pages (64
    /// MiB in a database made with 4 KiB pages, before [`PAGE_SIZE`]).
    const RESTART_ABOVE_FRAMES: i64 = 16_384;

    fn start(checkpointer: DatabaseConnection, writer: DatabaseConnection) -> Self {
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Self::EVERY);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                // Right behind the passive one, the RESTART copies only what
                // was committed meanwhile.
                if Self::passive(&checkpointer).await > Self::RESTART_ABOVE_FRAMES {
                    Self::restart(&writer).await;
                }
            }
        });
        Self(task.abort_handle())
    }

    /// How long a RESTART waits for the readers of the old log to finish
    /// before it gives up until the next second. It holds the writer
    /// meanwhile, and SQLite's busy handler waits in sleeps of up to 100 ms:
    /// with the 5 s of every other statement, one page of a ledger's
    /// re-read (10,000 rows) held every create for 105-117 ms.
    const RESTART_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

    /// Copies the log into the database and starts it over, unless a
    /// reader still needs it after [`Self::RESTART_WAIT`] (then what was
    /// copied stays copied and the log starts over on a later second). The
    /// wait is the connection's busy timeout, set for this statement only
    /// and in the same call, so no write of the group committer runs with it.
    async fn restart(writer: &DatabaseConnection) {
        let sql = format!(
            "PRAGMA busy_timeout = {}; PRAGMA wal_checkpoint(RESTART); PRAGMA busy_timeout = {}",
            Self::RESTART_WAIT.as_millis(),
            BUSY_TIMEOUT.as_millis()
        );
        if let Err(err) = writer.execute_unprepared(&sql).await {
            tracing::debug!(error = %err, "WAL restart failed; retried in a second");
            // What failed may have left the short wait in place.
            let restore = format!("PRAGMA busy_timeout = {}", BUSY_TIMEOUT.as_millis());
            if let Err(err) = writer.execute_unprepared(&restore).await {
                tracing::warn!(error = %err, "could not restore the writer's busy timeout");
            }
        }
    }

    /// Runs a passive checkpoint; answers the frames in the log (0 if it
    /// failed).
    async fn passive(connection: &DatabaseConnection) -> i64 {
        let checkpoint = connection
            .query_one(sea_orm::Statement::from_string(
                DbBackend::Sqlite,
                "PRAGMA wal_checkpoint(PASSIVE)",
            ))
            .await;
        // (busy, frames in the log, frames checkpointed)
        let frames = match checkpoint {
            Ok(Some(row)) => row.try_get_by_index::<i64>(1).unwrap_or(0),
            Ok(None) => 0,
            Err(err) => {
                tracing::debug!(error = %err, "WAL checkpoint failed; retried in a second");
                0
            }
        };
        frames
    }
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A secret as shown once to its owner, with the row that stores its hash.
#[derive(Debug, Clone)]
pub struct Issued<T> {
    pub record: T,
    pub secret: String,
}

/// Filters for listing an org's sandboxes.
#[derive(Debug, Clone, Default)]
pub struct SandboxFilter {
    pub state: Option<SandboxState>,
    pub labels: BTreeMap<String, String>,
    /// Return sandboxes with an id greater than this (ids are time-ordered).
    pub after: Option<String>,
    pub limit: u64,
    pub include_destroyed: bool,
}

/// What a host reported at registration.
#[derive(Debug, Clone)]
pub struct HostRegistration {
    pub hostname: String,
    pub runtime: String,
    pub isolated: bool,
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub images: Vec<String>,
    pub agent_version: String,
    /// Labels the agent reported (`--label k=v`).
    pub labels: BTreeMap<String, String>,
    /// The org of the host token's private pool; `None` for the shared
    /// fleet.
    pub org_id: Option<String>,
}

/// A new random secret with a readable kind prefix, e.g. `ck_3f9a...`.
fn generate_secret(prefix: &str) -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| CorralError::Internal(format!("getrandom: {e}")))?;
    Ok(format!("{prefix}_{}", hex::encode(bytes)))
}

/// The columns of a live sandbox its org's ledger meters it by
/// ([`Store::live_sandboxes_of`]).
#[derive(Clone, Debug, PartialEq, sea_orm::FromQueryResult)]
pub struct MeteredSandbox {
    pub id: String,
    pub state: String,
    pub cpu_millis: i64,
    pub memory_mb: i64,
    pub started_at: Option<chrono::DateTime<Utc>>,
    pub updated_at: chrono::DateTime<Utc>,
}

/// The hash under which a secret is stored.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn display_prefix(secret: &str) -> String {
    secret.chars().take(10).collect()
}

fn is_unique_violation(err: &sea_orm::DbErr) -> bool {
    matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

/// The page size of a new SQLite database (one that exists keeps its own).
///
/// A commit appends every page it dirtied to the write-ahead log, whole. A
/// create dirties a leaf of the sandboxes table, of each of its indexes and
/// of the audit table, a few hundred bytes of each: with SQLite's default
/// 4 KiB pages that was 38 KiB of log per create at half the maximum rate
/// (23,000-34,000 frames a second at 1,500 creates/s), a RESTART checkpoint
/// every two seconds, and every create queued behind it (throughput, quick:
/// half-rate p99 105-112 ms, 50-150 requests over 60 ms every two seconds).
/// With 1 KiB pages the same creates log 15 KiB each and the half-rate p99
/// was 18.8 ms. Rows longer than about 1 KiB spill into overflow pages, so
/// a sandbox with a large spec costs a page or two more to read.
pub const PAGE_SIZE: u32 = 1024;

/// How long a SQLite statement waits for a lock another connection holds.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a query waits for a pooled connection.
pub const ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl Store {
    /// Connects and brings the schema up to date. `url` is a SeaORM URL:
    /// `sqlite://path/to/corral.db?mode=rwc` or `postgres://...`.
    pub async fn connect(url: &str) -> Result<Self> {
        let sqlite = url.starts_with("sqlite:");
        let db = Database::connect(Self::options(url, if sqlite { 8 } else { 32 })).await?;
        Migrator::up(&db, None).await?;
        let (writer, checkpoints) = if sqlite {
            let writer = Database::connect(Self::options(url, 1)).await?;
            let checkpointer = Database::connect(Self::options(url, 1)).await?;
            let checkpoints = Checkpoints::start(checkpointer, writer.clone());
            (writer::Writer::grouped(writer), Some(Arc::new(checkpoints)))
        } else {
            (writer::Writer::Direct(db.clone()), None)
        };
        Ok(Self {
            db,
            writer,
            secrets: None,
            _checkpoints: checkpoints,
        })
    }

    /// How a pool of `max_connections` to `url` connects.
    fn options(url: &str, max_connections: u32) -> ConnectOptions {
        let mut options = ConnectOptions::new(url.to_string());
        options
            .sqlx_logging(false)
            .connect_timeout(std::time::Duration::from_secs(3))
            // A request waits this long for a connection before it fails
            // with `database_unavailable`: during an outage callers hear
            // so quickly rather than queue behind a dead database.
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .max_connections(max_connections);
        if url.starts_with("sqlite:") {
            // Readers run concurrently in WAL mode; writers have their
            // own one-connection pool (`Store::writer`).
            options
                .min_connections(1)
                // Per-connection settings go on every pooled connection, not
                // just the first: NORMAL is durable in WAL mode and saves an
                // fsync per commit; sqlx already waits 5 s on a busy lock.
                .map_sqlx_sqlite_opts(|sqlite| {
                    sqlite
                        .page_size(PAGE_SIZE)
                        .journal_mode(SqliteJournalMode::Wal)
                        .synchronous(SqliteSynchronous::Normal)
                        .busy_timeout(BUSY_TIMEOUT)
                        // Checkpoints run in the background (`Checkpoints`).
                        .pragma("wal_autocheckpoint", "0")
                        // A log that once grew is cut back to 64 MiB when it
                        // starts over.
                        .pragma("journal_size_limit", "67108864")
                });
        }
        options
    }

    /// This store with a secret key: sandbox secret env values are sealed
    /// with it on insert and opened with it for the agent.
    pub fn with_secret_key(mut self, key: Option<&crate::secrets::SecretKey>) -> Self {
        self.secrets = key.map(crate::secrets::SecretBox::new);
        self
    }

    /// The sealer of secret env values, if a key is configured.
    pub fn secrets(&self) -> Option<&crate::secrets::SecretBox> {
        self.secrets.as_ref()
    }

    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    pub fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    /// A cheap round trip, for readiness checks.
    pub async fn ping(&self) -> Result<()> {
        self.db.ping().await?;
        Ok(())
    }

    // ---- organisations -------------------------------------------------

    pub async fn create_org(&self, name: &str) -> Result<org::Model> {
        let model = org::ActiveModel {
            id: Set(new_id("org")),
            name: Set(name.to_string()),
            billing_status: Set(BillingStatus::Active.as_str().to_string()),
            created_at: Set(Utc::now()),
            plan_id: Set(None),
            billing_exempt: Set(false),
            grace_deadline: Set(None),
            max_sandboxes: Set(None),
            max_cpu_millis: Set(None),
            max_memory_mb: Set(None),
            max_ttl_seconds: Set(None),
            private_pool_only: Set(false),
            allow_strategy_override: Set(None),
        };
        model.insert(&self.writer).await.map_err(|err| {
            if is_unique_violation(&err) {
                CorralError::Conflict(format!("an organisation named {name:?} already exists"))
            } else {
                err.into()
            }
        })
    }

    pub async fn get_org(&self, id: &str) -> Result<Option<org::Model>> {
        Ok(org::Entity::find_by_id(id).one(&self.db).await?)
    }

    pub async fn find_org_by_name(&self, name: &str) -> Result<Option<org::Model>> {
        Ok(org::Entity::find()
            .filter(org::Column::Name.eq(name))
            .one(&self.db)
            .await?)
    }

    /// Sets the org's placement settings: whether its sandboxes go only to
    /// its private pool, and whether its requests may choose the strategy
    /// (`None`: as the deployment says).
    pub async fn set_org_placement(
        &self,
        id: &str,
        private_pool_only: bool,
        allow_strategy_override: Option<bool>,
    ) -> Result<org::Model> {
        let updated = org::Entity::update_many()
            .col_expr(org::Column::PrivatePoolOnly, Expr::value(private_pool_only))
            .col_expr(
                org::Column::AllowStrategyOverride,
                Expr::value(allow_strategy_override),
            )
            .filter(org::Column::Id.eq(id))
            .exec(&self.writer)
            .await?;
        if updated.rows_affected == 0 {
            return Err(CorralError::NotFound("organisation"));
        }
        self.get_org(id)
            .await?
            .ok_or(CorralError::NotFound("organisation"))
    }

    /// The ids of the orgs whose sandboxes go only to their private pool.
    pub async fn private_pool_only_orgs(&self) -> Result<Vec<String>> {
        Ok(org::Entity::find()
            .filter(org::Column::PrivatePoolOnly.eq(true))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|o| o.id)
            .collect())
    }

    /// The orgs with a strategy-override setting of their own, and it.
    pub async fn org_strategy_overrides(&self) -> Result<Vec<(String, bool)>> {
        Ok(org::Entity::find()
            .filter(org::Column::AllowStrategyOverride.is_not_null())
            .all(&self.db)
            .await?
            .into_iter()
            .filter_map(|o| Some((o.id, o.allow_strategy_override?)))
            .collect())
    }

    pub async fn list_orgs(&self) -> Result<Vec<org::Model>> {
        Ok(org::Entity::find()
            .order_by_asc(org::Column::Id)
            .all(&self.db)
            .await?)
    }

    // ---- API keys ------------------------------------------------------

    /// An `admin` key (the key an org is created with).
    pub async fn create_api_key(&self, org_id: &str, name: &str) -> Result<Issued<api_key::Model>> {
        self.issue_api_key(org_id, name, "admin", None).await
    }

    /// A key with a role and an optional expiry.
    pub async fn issue_api_key(
        &self,
        org_id: &str,
        name: &str,
        role: &str,
        expires_at: Option<chrono::DateTime<Utc>>,
    ) -> Result<Issued<api_key::Model>> {
        let secret = generate_secret("ck")?;
        let record = api_key::ActiveModel {
            id: Set(new_id("key")),
            org_id: Set(org_id.to_string()),
            name: Set(name.to_string()),
            prefix: Set(display_prefix(&secret)),
            secret_hash: Set(hash_secret(&secret)),
            created_at: Set(Utc::now()),
            last_used_at: Set(None),
            revoked_at: Set(None),
            role: Set(role.to_string()),
            expires_at: Set(expires_at),
        }
        .insert(&self.writer)
        .await?;
        Ok(Issued { record, secret })
    }

    pub async fn list_api_keys(&self, org_id: &str) -> Result<Vec<api_key::Model>> {
        Ok(api_key::Entity::find()
            .filter(api_key::Column::OrgId.eq(org_id))
            .order_by_asc(api_key::Column::Id)
            .all(&self.db)
            .await?)
    }

    /// Revokes one of the org's keys. Another org's key is "not found".
    pub async fn revoke_api_key(&self, org_id: &str, key_id: &str) -> Result<api_key::Model> {
        let key = api_key::Entity::find_by_id(key_id)
            .filter(api_key::Column::OrgId.eq(org_id))
            .one(&self.db)
            .await?
            .ok_or(CorralError::NotFound("api key"))?;
        if key.revoked_at.is_some() {
            return Ok(key);
        }
        let mut active = key.into_active_model();
        active.revoked_at = Set(Some(Utc::now()));
        Ok(active.update(&self.writer).await?)
    }

    /// The live (unrevoked, unexpired) key with this secret, if any.
    pub async fn authenticate_api_key(&self, secret: &str) -> Result<Option<api_key::Model>> {
        Ok(api_key::Entity::find()
            .filter(api_key::Column::SecretHash.eq(hash_secret(secret)))
            .filter(api_key::Column::RevokedAt.is_null())
            .one(&self.db)
            .await?
            .filter(|key| key.expires_at.is_none_or(|at| at > Utc::now())))
    }

    // ---- host tokens ---------------------------------------------------

    /// Issues a token for `host_id` (a new host when `None`). The host id is
    /// fixed by the token: an agent can only ever speak as that host.
    pub async fn create_host_token(
        &self,
        name: &str,
        host_id: Option<String>,
    ) -> Result<Issued<host_token::Model>> {
        self.issue_host_token(name, host_id, None, None).await
    }

    /// Like [`Store::create_host_token`], with an optional expiry and an
    /// optional org whose private pool the host joins.
    pub async fn issue_host_token(
        &self,
        name: &str,
        host_id: Option<String>,
        expires_at: Option<chrono::DateTime<Utc>>,
        org_id: Option<String>,
    ) -> Result<Issued<host_token::Model>> {
        let secret = generate_secret("ch")?;
        let record = host_token::ActiveModel {
            id: Set(new_id("htk")),
            host_id: Set(host_id.unwrap_or_else(|| new_id("hst"))),
            name: Set(name.to_string()),
            prefix: Set(display_prefix(&secret)),
            secret_hash: Set(hash_secret(&secret)),
            created_at: Set(Utc::now()),
            revoked_at: Set(None),
            expires_at: Set(expires_at),
            org_id: Set(org_id),
        }
        .insert(&self.writer)
        .await?;
        Ok(Issued { record, secret })
    }

    pub async fn list_host_tokens(&self) -> Result<Vec<host_token::Model>> {
        Ok(host_token::Entity::find()
            .order_by_asc(host_token::Column::Id)
            .all(&self.db)
            .await?)
    }

    pub async fn revoke_host_token(&self, id: &str) -> Result<host_token::Model> {
        let token = host_token::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or(CorralError::NotFound("host token"))?;
        if token.revoked_at.is_some() {
            return Ok(token);
        }
        let mut active = token.into_active_model();
        active.revoked_at = Set(Some(Utc::now()));
        Ok(active.update(&self.writer).await?)
    }

    pub async fn authenticate_host_token(&self, secret: &str) -> Result<Option<host_token::Model>> {
        Ok(host_token::Entity::find()
            .filter(host_token::Column::SecretHash.eq(hash_secret(secret)))
            .filter(host_token::Column::RevokedAt.is_null())
            .one(&self.db)
            .await?
            .filter(|token| token.expires_at.is_none_or(|at| at > Utc::now())))
    }

    // ---- hosts ---------------------------------------------------------

    /// Records a host's registration (first time or again) as `ready`.
    pub async fn upsert_host(&self, id: &str, reg: &HostRegistration) -> Result<host::Model> {
        let now = Utc::now();
        let existing = host::Entity::find_by_id(id).one(&self.db).await?;
        let images =
            serde_json::to_value(&reg.images).map_err(|e| CorralError::Internal(e.to_string()))?;
        let mut active = match &existing {
            Some(model) => model.clone().into_active_model(),
            None => host::ActiveModel {
                id: Set(id.to_string()),
                created_at: Set(now),
                admin_state: Set(HostAdminState::Active.as_str().to_string()),
                ..Default::default()
            },
        };
        let labels =
            serde_json::to_value(&reg.labels).map_err(|e| CorralError::Internal(e.to_string()))?;
        active.labels = Set(Some(labels));
        active.org_id = Set(reg.org_id.clone());
        active.hostname = Set(reg.hostname.clone());
        active.state = Set(HostState::Ready.as_str().to_string());
        active.runtime = Set(reg.runtime.clone());
        active.isolated = Set(reg.isolated);
        active.cpu_millis = Set(i64::try_from(reg.cpu_millis).unwrap_or(i64::MAX));
        active.memory_mb = Set(i64::try_from(reg.memory_mb).unwrap_or(i64::MAX));
        active.images = Set(images);
        active.agent_version = Set(reg.agent_version.clone());
        active.last_seen_at = Set(Some(now));
        active.updated_at = Set(now);
        Ok(match existing {
            Some(_) => active.update(&self.writer).await?,
            None => active.insert(&self.writer).await?,
        })
    }

    pub async fn set_host_state(&self, id: &str, state: HostState) -> Result<()> {
        host::Entity::update_many()
            .col_expr(host::Column::State, Expr::value(state.as_str()))
            .col_expr(host::Column::UpdatedAt, Expr::value(Utc::now()))
            .filter(host::Column::Id.eq(id))
            .exec(&self.writer)
            .await?;
        Ok(())
    }

    /// Marks every host that is not offline or decommissioned disconnected,
    /// in one statement: no agent is connected to a control plane that just
    /// started.
    pub async fn disconnect_all_hosts(&self) -> Result<u64> {
        let done = host::Entity::update_many()
            .col_expr(
                host::Column::State,
                Expr::value(HostState::Disconnected.as_str()),
            )
            .col_expr(host::Column::UpdatedAt, Expr::value(Utc::now()))
            .filter(host::Column::State.is_not_in([
                HostState::Disconnected.as_str(),
                HostState::Offline.as_str(),
            ]))
            .filter(host::Column::AdminState.ne(HostAdminState::Decommissioned.as_str()))
            .exec(&self.writer)
            .await?;
        Ok(done.rows_affected)
    }

    /// Records an operator decision about a host.
    pub async fn set_host_admin(&self, id: &str, admin: HostAdminState) -> Result<host::Model> {
        let host = host::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or(CorralError::NotFound("host"))?;
        let mut active = host.into_active_model();
        active.admin_state = Set(admin.as_str().to_string());
        active.updated_at = Set(Utc::now());
        Ok(active.update(&self.writer).await?)
    }

    /// Revokes every token of a host (a decommissioned host).
    pub async fn revoke_host_tokens_of(&self, host_id: &str) -> Result<Vec<host_token::Model>> {
        let tokens = host_token::Entity::find()
            .filter(host_token::Column::HostId.eq(host_id))
            .filter(host_token::Column::RevokedAt.is_null())
            .all(&self.db)
            .await?;
        let mut revoked = Vec::new();
        for token in tokens {
            let mut active = token.into_active_model();
            active.revoked_at = Set(Some(Utc::now()));
            revoked.push(active.update(&self.writer).await?);
        }
        Ok(revoked)
    }

    pub async fn list_hosts(&self) -> Result<Vec<host::Model>> {
        Ok(host::Entity::find()
            .order_by_asc(host::Column::Id)
            .all(&self.db)
            .await?)
    }

    pub async fn get_host(&self, id: &str) -> Result<Option<host::Model>> {
        Ok(host::Entity::find_by_id(id).one(&self.db).await?)
    }

    // ---- sandboxes -----------------------------------------------------

    pub async fn insert_sandbox(&self, model: sandbox::Model) -> Result<sandbox::Model> {
        Ok(model
            .into_active_model()
            .reset_all()
            .insert(&self.writer)
            .await?)
    }

    /// Writes the whole row. Only the sandbox's own actor calls this.
    pub async fn save_sandbox(&self, model: sandbox::Model) -> Result<sandbox::Model> {
        Ok(model
            .into_active_model()
            .reset_all()
            .update(&self.writer)
            .await?)
    }

    /// One of the org's sandboxes; another org's is "not found".
    pub async fn get_sandbox(&self, org_id: &str, id: &str) -> Result<Option<sandbox::Model>> {
        Ok(sandbox::Entity::find_by_id(id)
            .filter(sandbox::Column::OrgId.eq(org_id))
            .one(&self.db)
            .await?)
    }

    pub async fn get_sandbox_any_org(&self, id: &str) -> Result<Option<sandbox::Model>> {
        Ok(sandbox::Entity::find_by_id(id).one(&self.db).await?)
    }

    /// A page of the org's sandboxes in creation order. Label filters are
    /// applied here rather than in SQL (JSON operators differ between SQLite
    /// and PostgreSQL); the scan stops after a bounded number of rows.
    pub async fn list_sandboxes(
        &self,
        org_id: &str,
        filter: &SandboxFilter,
    ) -> Result<Vec<sandbox::Model>> {
        const MAX_SCANNED: u64 = 10_000;
        let limit = filter.limit.clamp(1, 1000);
        let mut out = Vec::new();
        let mut after = filter.after.clone();
        let mut scanned = 0;
        while (out.len() as u64) < limit && scanned < MAX_SCANNED {
            let mut query = sandbox::Entity::find()
                .filter(sandbox::Column::OrgId.eq(org_id))
                .order_by_asc(sandbox::Column::Id)
                .limit(limit.max(100));
            if let Some(after) = &after {
                query = query.filter(sandbox::Column::Id.gt(after.as_str()));
            }
            if let Some(state) = filter.state {
                query = query.filter(sandbox::Column::State.eq(state.as_str()));
            } else if !filter.include_destroyed {
                query = query.filter(sandbox::Column::State.ne(SandboxState::Destroyed.as_str()));
            }
            let batch = query.all(&self.db).await?;
            let exhausted = (batch.len() as u64) < limit.max(100);
            scanned += batch.len() as u64;
            for row in batch {
                after = Some(row.id.clone());
                if labels_match(&row.labels, &filter.labels) {
                    out.push(row);
                    if out.len() as u64 == limit {
                        break;
                    }
                }
            }
            if exhausted {
                break;
            }
        }
        Ok(out)
    }

    /// Every sandbox that is not destroyed: the actors to rebuild at start-up.
    pub async fn load_live_sandboxes(&self) -> Result<Vec<sandbox::Model>> {
        Ok(sandbox::Entity::find()
            .filter(sandbox::Column::State.ne(SandboxState::Destroyed.as_str()))
            .order_by_asc(sandbox::Column::Id)
            .all(&self.db)
            .await?)
    }

    pub async fn count_sandboxes_by_state(&self, state: SandboxState) -> Result<u64> {
        Ok(sandbox::Entity::find()
            .filter(sandbox::Column::State.eq(state.as_str()))
            .count(&self.db)
            .await?)
    }

    // ---- ledger --------------------------------------------------------

    /// Appends an entry unless one with the same idempotency key exists, in
    /// which case the existing entry is returned and nothing changes.
    pub async fn append_ledger_entry(
        &self,
        entry: NewLedgerEntry,
    ) -> Result<(ledger_entry::Model, bool)> {
        let key = entry.idempotency_key.clone();
        match entry.into_active().insert(&self.writer).await {
            Ok(model) => Ok((model, true)),
            Err(err) if is_unique_violation(&err) => {
                let existing = ledger_entry::Entity::find()
                    .filter(ledger_entry::Column::IdempotencyKey.eq(key))
                    .one(&self.db)
                    .await?
                    .ok_or_else(|| CorralError::Internal("ledger entry vanished".into()))?;
                Ok((existing, false))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Appends entries, each skipped if its idempotency key exists already
    /// (or came earlier in `entries`), in statements of
    /// [`Self::ENTRIES_PER_STATEMENT`], each written whole or not at all: a
    /// billing tick writes one entry per running sandbox of the org, and one
    /// transaction of 40,000 rows held SQLite's only write lock for 3 s, so
    /// every create behind it timed out (half-rate p99 5-8 s). Between two
    /// short statements other writers get their turn.
    ///
    /// Answers, per entry of the part that was committed, whether it was
    /// inserted (so the caller applies exactly the new ones), and why the
    /// rest was not written if it was not: entries past `inserted` were not
    /// written and are charged again later under the same keys.
    pub async fn append_ledger_entries(&self, entries: Vec<NewLedgerEntry>) -> Appended {
        self.append_ledger_entries_resting(entries, 0).await
    }

    /// [`Self::append_ledger_entries`], resting after each statement `rest`
    /// times as long as the statement took: a background write that leaves
    /// the one writer to others most of the time.
    pub async fn append_ledger_entries_resting(
        &self,
        entries: Vec<NewLedgerEntry>,
        rest: u32,
    ) -> Appended {
        use sea_orm::sea_query::OnConflict;
        use sea_orm::QueryTrait;
        let mut appended = Appended::default();
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            let chunk: Vec<NewLedgerEntry> =
                entries.by_ref().take(Self::ENTRIES_PER_STATEMENT).collect();
            let keys: Vec<String> = chunk.iter().map(|e| e.idempotency_key.clone()).collect();
            // Only the keys of the new rows come back: all that is needed.
            let mut insert = ledger_entry::Entity::insert_many(
                chunk.into_iter().map(NewLedgerEntry::into_active),
            )
            .on_conflict(
                OnConflict::column(ledger_entry::Column::IdempotencyKey)
                    .do_nothing()
                    .to_owned(),
            )
            .into_query();
            insert.returning_col(ledger_entry::Column::IdempotencyKey);
            let statement = self.writer.get_database_backend().build(&insert);
            let started = std::time::Instant::now();
            // One statement: all of it is written or none.
            let written = self.writer.query_all(statement).await.and_then(|rows| {
                rows.iter()
                    .map(|row| row.try_get_by_index::<String>(0))
                    .collect::<std::result::Result<Vec<_>, _>>()
            });
            let mut added: std::collections::HashSet<String> = match written {
                Ok(added) => added.into_iter().collect(),
                Err(err) => {
                    appended.failed = Some(err.into());
                    break;
                }
            };
            // `remove`: a key given twice was inserted once, for its first
            // (given again in a later transaction, it conflicts there).
            appended
                .inserted
                .extend(keys.iter().map(|key| added.remove(key)));
            if rest > 0 && entries.peek().is_some() {
                tokio::time::sleep(started.elapsed() * rest).await;
            }
        }
        appended
    }

    /// Rows per statement of [`Self::append_ledger_entries`]:
    /// a few milliseconds of SQLite's write lock; 11 bound values each stays
    /// far below SQLite's and PostgreSQL's limits on parameters.
    pub const ENTRIES_PER_STATEMENT: usize = 250;

    /// The end and carry of the latest usage period of each of these
    /// sandboxes (metering resumes after it). A sandbox's periods are
    /// appended in order by its one ledger, so its latest is its highest id.
    pub async fn last_usage_of(
        &self,
        sandbox_ids: &[String],
    ) -> Result<std::collections::HashMap<String, (chrono::DateTime<Utc>, i64)>> {
        let mut found = std::collections::HashMap::new();
        for chunk in sandbox_ids.chunks(500) {
            let latest: Vec<i64> = ledger_entry::Entity::find()
                .select_only()
                .column_as(ledger_entry::Column::Id.max(), "latest")
                .filter(ledger_entry::Column::SandboxId.is_in(chunk.iter().cloned()))
                .filter(ledger_entry::Column::Kind.eq("usage"))
                .group_by(ledger_entry::Column::SandboxId)
                .into_tuple::<Option<i64>>()
                .all(&self.db)
                .await?
                .into_iter()
                .flatten()
                .collect();
            if latest.is_empty() {
                continue;
            }
            for entry in ledger_entry::Entity::find()
                .filter(ledger_entry::Column::Id.is_in(latest))
                .all(&self.db)
                .await?
            {
                if let (Some(sandbox), Some(end)) = (entry.sandbox_id, entry.period_end) {
                    found.insert(sandbox, (end, entry.carry.unwrap_or(0)));
                }
            }
        }
        Ok(found)
    }

    /// Usage entries of an org whose period starts in `[from, to)`.
    pub async fn usage_between(
        &self,
        org_id: &str,
        from: chrono::DateTime<Utc>,
        to: chrono::DateTime<Utc>,
    ) -> Result<Vec<ledger_entry::Model>> {
        Ok(ledger_entry::Entity::find()
            .filter(ledger_entry::Column::OrgId.eq(org_id))
            .filter(ledger_entry::Column::Kind.eq("usage"))
            .filter(ledger_entry::Column::PeriodStart.gte(from))
            .filter(ledger_entry::Column::PeriodStart.lt(to))
            .order_by_asc(ledger_entry::Column::PeriodStart)
            .limit(100_000)
            .all(&self.db)
            .await?)
    }

    /// Every usage entry of an org (the audit).
    pub async fn all_usage(&self, org_id: &str) -> Result<Vec<ledger_entry::Model>> {
        Ok(ledger_entry::Entity::find()
            .filter(ledger_entry::Column::OrgId.eq(org_id))
            .filter(ledger_entry::Column::Kind.eq("usage"))
            .order_by_asc(ledger_entry::Column::Id)
            .all(&self.db)
            .await?)
    }

    /// What a ledger meters of each of an org's live sandboxes: a handful
    /// of columns, not the row (a resync reads thousands; decoding the
    /// command, env, labels and placement JSON of each was most of it).
    pub async fn live_sandboxes_of(&self, org_id: &str) -> Result<Vec<MeteredSandbox>> {
        self.live_sandboxes_page(org_id, None, None).await
    }

    /// A page of [`Self::live_sandboxes_of`] in id order: at most `limit`
    /// rows whose ids come after `after`.
    pub async fn live_sandboxes_page(
        &self,
        org_id: &str,
        after: Option<&str>,
        limit: Option<u64>,
    ) -> Result<Vec<MeteredSandbox>> {
        use sandbox::Column as C;
        let mut query = sandbox::Entity::find()
            .select_only()
            .columns([
                C::Id,
                C::State,
                C::CpuMillis,
                C::MemoryMb,
                C::StartedAt,
                C::UpdatedAt,
            ])
            .filter(C::OrgId.eq(org_id))
            .filter(C::State.ne(SandboxState::Destroyed.as_str()));
        if let Some(after) = after {
            query = query.filter(C::Id.gt(after));
        }
        if let Some(limit) = limit {
            query = query.order_by_asc(C::Id).limit(limit);
        }
        Ok(query.into_model::<MeteredSandbox>().all(&self.db).await?)
    }

    pub async fn save_org(&self, model: org::Model) -> Result<org::Model> {
        let mut active: org::ActiveModel = model.into_active_model().reset_all();
        // Owned by `set_org_placement`: a ledger's copy of the row may be
        // older than the admin's last change.
        active.private_pool_only = sea_orm::ActiveValue::NotSet;
        active.allow_strategy_override = sea_orm::ActiveValue::NotSet;
        Ok(active.update(&self.writer).await?)
    }

    pub async fn record_billing_event(
        &self,
        org_id: &str,
        from: BillingStatus,
        to: BillingStatus,
        balance_micros: i64,
        reason: &str,
    ) -> Result<()> {
        billing_event::ActiveModel {
            org_id: Set(org_id.to_string()),
            from_status: Set(from.as_str().to_string()),
            to_status: Set(to.as_str().to_string()),
            balance_micros: Set(balance_micros),
            reason: Set(reason.to_string()),
            created_at: Set(Utc::now()),
            ..Default::default()
        }
        .insert(&self.writer)
        .await?;
        Ok(())
    }

    pub async fn billing_events(&self, org_id: &str) -> Result<Vec<billing_event::Model>> {
        Ok(billing_event::Entity::find()
            .filter(billing_event::Column::OrgId.eq(org_id))
            .order_by_asc(billing_event::Column::Id)
            .all(&self.db)
            .await?)
    }

    // ---- price plans -----------------------------------------------------

    pub async fn get_plan(&self, id: &str) -> Result<Option<price_plan::Model>> {
        Ok(price_plan::Entity::find_by_id(id.to_string())
            .one(&self.db)
            .await?)
    }

    pub async fn find_plan_by_name(&self, name: &str) -> Result<Option<price_plan::Model>> {
        Ok(price_plan::Entity::find()
            .filter(price_plan::Column::Name.eq(name))
            .one(&self.db)
            .await?)
    }

    pub async fn list_plans(&self) -> Result<Vec<price_plan::Model>> {
        Ok(price_plan::Entity::find()
            .order_by_asc(price_plan::Column::Name)
            .all(&self.db)
            .await?)
    }

    pub async fn create_plan(&self, plan: price_plan::Model) -> Result<price_plan::Model> {
        let name = plan.name.clone();
        let active: price_plan::ActiveModel = plan.into();
        active.insert(&self.writer).await.map_err(|err| {
            if is_unique_violation(&err) {
                CorralError::Conflict(format!("a plan named {name:?} already exists"))
            } else {
                err.into()
            }
        })
    }

    /// The balance as the sum of the org's entries.
    pub async fn ledger_balance(&self, org_id: &str) -> Result<i64> {
        let sum: Option<Option<i64>> = ledger_entry::Entity::find()
            .select_only()
            // PostgreSQL sums BIGINT into NUMERIC; cast back so both
            // databases return a 64-bit integer.
            .column_as(
                Expr::expr(Func::cast_as(
                    Func::sum(Expr::col(ledger_entry::Column::AmountMicros)),
                    Alias::new("BIGINT"),
                )),
                "total",
            )
            .filter(ledger_entry::Column::OrgId.eq(org_id))
            .into_tuple()
            .one(&self.db)
            .await?;
        Ok(sum.flatten().unwrap_or(0))
    }

    pub async fn list_ledger_entries(
        &self,
        org_id: &str,
        after: Option<i64>,
        limit: u64,
    ) -> Result<Vec<ledger_entry::Model>> {
        let mut query = ledger_entry::Entity::find()
            .filter(ledger_entry::Column::OrgId.eq(org_id))
            .order_by_asc(ledger_entry::Column::Id)
            .limit(limit.clamp(1, 1000));
        if let Some(after) = after {
            query = query.filter(ledger_entry::Column::Id.gt(after));
        }
        Ok(query.all(&self.db).await?)
    }
}

/// What [`Store::append_ledger_entries`] wrote.
#[derive(Debug, Default)]
pub struct Appended {
    /// Whether each entry was new, for the entries that were committed (a
    /// prefix of those given).
    pub inserted: Vec<bool>,
    /// Why the entries past `inserted` were not written.
    pub failed: Option<CorralError>,
}

/// An entry to append to an org's ledger.
#[derive(Debug, Clone)]
pub struct NewLedgerEntry {
    pub org_id: String,
    pub kind: String,
    pub amount_micros: i64,
    pub idempotency_key: String,
    pub sandbox_id: Option<String>,
    pub description: String,
    pub period_start: Option<chrono::DateTime<Utc>>,
    pub period_end: Option<chrono::DateTime<Utc>>,
    pub carry: Option<i64>,
}

impl NewLedgerEntry {
    fn into_active(self) -> ledger_entry::ActiveModel {
        ledger_entry::ActiveModel {
            org_id: Set(self.org_id),
            kind: Set(self.kind),
            amount_micros: Set(self.amount_micros),
            idempotency_key: Set(self.idempotency_key),
            sandbox_id: Set(self.sandbox_id),
            description: Set(self.description),
            created_at: Set(Utc::now()),
            period_start: Set(self.period_start),
            period_end: Set(self.period_end),
            carry: Set(self.carry),
            ..Default::default()
        }
    }
}

fn labels_match(stored: &serde_json::Value, wanted: &BTreeMap<String, String>) -> bool {
    wanted
        .iter()
        .all(|(k, v)| stored.get(k).and_then(|x| x.as_str()) == Some(v.as_str()))
}

#[cfg(test)]
mod tests {
    use sea_orm::TransactionTrait;

    use super::*;

    async fn one_number(connection: &impl ConnectionTrait, sql: &str) -> i64 {
        connection
            .query_one(sea_orm::Statement::from_string(DbBackend::Sqlite, sql))
            .await
            .expect("query")
            .expect("a row")
            .try_get_by_index::<i64>(0)
            .expect("a number")
    }

    #[tokio::test]
    async fn a_new_database_is_made_of_small_pages() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}/corral.db?mode=rwc", dir.path().display());
        let store = Store::connect(&url).await.expect("store");
        let page_size = one_number(store.connection(), "PRAGMA page_size").await;
        assert_eq!(page_size, i64::from(PAGE_SIZE));
    }

    #[tokio::test]
    async fn a_restart_gives_up_on_a_reader_of_the_log_and_starts_it_over_once_it_left() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}/corral.db?mode=rwc", dir.path().display());
        let writer = Database::connect(Store::options(&url, 1))
            .await
            .expect("writer");
        let reader = Database::connect(Store::options(&url, 1))
            .await
            .expect("reader");
        let checkpointer = Database::connect(Store::options(&url, 1))
            .await
            .expect("checkpointer");
        writer
            .execute_unprepared("CREATE TABLE t (k INTEGER); INSERT INTO t VALUES (1)")
            .await
            .expect("setup");
        // A reader whose snapshot holds frames of the log, then more log.
        let reading = reader.begin().await.expect("begin");
        assert_eq!(one_number(&reading, "SELECT count(*) FROM t").await, 1);
        for k in 2..=20 {
            writer
                .execute_unprepared(&format!("INSERT INTO t VALUES ({k})"))
                .await
                .expect("insert");
        }

        // Any wait longer than RESTART_WAIT would be the 5 s busy timeout.
        let started = std::time::Instant::now();
        Checkpoints::restart(&writer).await;
        assert!(
            started.elapsed() < BUSY_TIMEOUT / 2,
            "the restart waited {:?} for the reader",
            started.elapsed()
        );
        assert_eq!(
            one_number(&writer, "PRAGMA busy_timeout").await,
            BUSY_TIMEOUT.as_millis() as i64,
            "writes wait as long as before"
        );
        assert_eq!(
            one_number(&reading, "SELECT count(*) FROM t").await,
            1,
            "the reader still reads its snapshot"
        );
        let kept = Checkpoints::passive(&checkpointer).await;
        reading.commit().await.expect("end the read");
        assert!(kept > 20, "the log was not started over: {kept} frames");

        // With the reader gone the log starts over: the next commit writes
        // from its start.
        Checkpoints::restart(&writer).await;
        writer
            .execute_unprepared("INSERT INTO t VALUES (21)")
            .await
            .expect("insert");
        let frames = Checkpoints::passive(&checkpointer).await;
        assert!(
            frames < kept,
            "{frames} frames after the restart, {kept} before"
        );
    }
}
