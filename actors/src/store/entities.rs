//! SeaORM entities, one module per table (see `corral-migrations`).

pub mod org {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "orgs")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub name: String,
        pub billing_status: String,
        pub created_at: DateTimeUtc,
        /// `None` means the default plan.
        pub plan_id: Option<String>,
        /// Metered but never gated.
        pub billing_exempt: bool,
        /// Set while in `grace`: when the org is suspended.
        pub grace_deadline: Option<DateTimeUtc>,
        pub max_sandboxes: Option<i64>,
        pub max_cpu_millis: Option<i64>,
        pub max_memory_mb: Option<i64>,
        pub max_ttl_seconds: Option<i64>,
        /// Its sandboxes go only to its private pool (set by the platform
        /// admin; written only by [`crate::store::Store::set_org_placement`]).
        pub private_pool_only: bool,
        /// Whether its requests may choose the placement strategy; `None`
        /// follows the deployment (written only by
        /// [`crate::store::Store::set_org_placement`]).
        pub allow_strategy_override: Option<bool>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod api_key {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "api_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub org_id: String,
        pub name: String,
        pub prefix: String,
        pub secret_hash: String,
        pub created_at: DateTimeUtc,
        pub last_used_at: Option<DateTimeUtc>,
        pub revoked_at: Option<DateTimeUtc>,
        /// admin, developer, viewer or billing.
        pub role: String,
        /// After this the key is refused like a revoked one.
        pub expires_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod host_token {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "host_tokens")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub host_id: String,
        pub name: String,
        pub prefix: String,
        pub secret_hash: String,
        pub created_at: DateTimeUtc,
        pub revoked_at: Option<DateTimeUtc>,
        /// After this the token is refused like a revoked one.
        pub expires_at: Option<DateTimeUtc>,
        /// Set for a token of an org's private pool: its host takes only
        /// that org's sandboxes.
        pub org_id: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod host {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "hosts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub hostname: String,
        pub state: String,
        pub runtime: String,
        pub isolated: bool,
        pub cpu_millis: i64,
        pub memory_mb: i64,
        pub images: Json,
        pub agent_version: String,
        pub last_seen_at: Option<DateTimeUtc>,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
        /// Labels the agent reported (`--label k=v`), a JSON map.
        pub labels: Option<Json>,
        /// The org whose private pool this host is in; `None` for the
        /// shared fleet.
        pub org_id: Option<String>,
        /// What operators decided: active, cordoned, draining or
        /// decommissioned (see [`crate::domain::HostAdminState`]).
        pub admin_state: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod sandbox {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "sandboxes")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub org_id: String,
        pub host_id: Option<String>,
        pub name: Option<String>,
        pub image: String,
        pub command: Json,
        pub env: Json,
        pub labels: Json,
        pub workdir: Option<String>,
        pub cpu_millis: i64,
        pub memory_mb: i64,
        pub ttl_seconds: Option<i64>,
        pub state: String,
        pub desired_state: String,
        pub failure_reason: Option<String>,
        pub exit_code: Option<i32>,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
        pub started_at: Option<DateTimeUtc>,
        pub expires_at: Option<DateTimeUtc>,
        /// never or on_host_loss (see [`crate::domain::RestartPolicy`]).
        pub restart_policy: String,
        /// The placement constraints it was created with
        /// ([`crate::domain::Placement`]), reused when it is placed again.
        pub placement: Option<Json>,
        /// Secret env values, each sealed (`crate::secrets`): never
        /// plaintext. `None` means none.
        pub secret_env: Option<Json>,
        /// `domain::SandboxSecurity` as JSON; `None` means the defaults.
        pub security: Option<Json>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}

    #[cfg(any(test, feature = "testing"))]
    impl Model {
        /// A sandbox row for tests and benchmark seeds: 100 mCPU, 64 MiB, no
        /// TTL, changed now; callers set what they care about on top.
        pub fn for_test(org_id: &str, host_id: &str, state: crate::domain::SandboxState) -> Self {
            let now = chrono::Utc::now();
            Self {
                id: crate::domain::new_id("sbx"),
                org_id: org_id.into(),
                host_id: Some(host_id.into()),
                name: None,
                image: "busybox".into(),
                command: serde_json::json!([]),
                env: serde_json::json!({}),
                labels: serde_json::json!({}),
                workdir: None,
                cpu_millis: 100,
                memory_mb: 64,
                ttl_seconds: None,
                state: state.as_str().into(),
                desired_state: "running".into(),
                failure_reason: None,
                exit_code: None,
                created_at: now,
                updated_at: now,
                started_at: None,
                expires_at: None,
                restart_policy: "never".into(),
                placement: None,
                secret_env: None,
                security: None,
            }
        }
    }
}

pub mod ledger_entry {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "ledger_entries")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub org_id: String,
        pub kind: String,
        pub amount_micros: i64,
        pub idempotency_key: String,
        pub sandbox_id: Option<String>,
        pub description: String,
        pub created_at: DateTimeUtc,
        /// The metered span of a usage entry.
        pub period_start: Option<DateTimeUtc>,
        pub period_end: Option<DateTimeUtc>,
        /// Sub-micro-unit remainder carried into the sandbox's next period,
        /// in units of 1 / [`crate::billing::PRICE_DENOMINATOR`] micro.
        pub carry: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod price_plan {
    use sea_orm::entity::prelude::*;

    /// Prices in integer micro-units per resource-hour.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "price_plans")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub name: String,
        pub cpu_micros_per_vcpu_hour: i64,
        pub memory_micros_per_gib_hour: i64,
        pub stopped_memory_micros_per_gib_hour: i64,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod billing_event {
    use sea_orm::entity::prelude::*;

    /// One transition of an org's billing status.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "billing_events")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub org_id: String,
        pub from_status: String,
        pub to_status: String,
        pub balance_micros: i64,
        pub reason: String,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod audit_event {
    use sea_orm::entity::prelude::*;

    /// One mutating REST request: who, what, on which target, and how it
    /// ended. Append-only.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_events")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        /// The caller's org; `None` for platform-admin and unauthenticated
        /// requests.
        pub org_id: Option<String>,
        /// An API key id, `platform-admin` or `anonymous`.
        pub actor: String,
        /// `METHOD /route/{id}` with ids replaced by placeholders.
        pub action: String,
        pub method: String,
        pub path: String,
        pub target_id: Option<String>,
        pub status: i32,
        pub source_addr: Option<String>,
        pub request_id: String,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
