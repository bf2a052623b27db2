//! The Corral control-plane schema, as SeaORM migrations that run unchanged
//! on SQLite and PostgreSQL.
//!
//! Migrations are append-only: a migration that has been released is never
//! edited or renumbered (LESSONS 34); a change is a new migration.

pub use sea_orm_migration::prelude::*;

mod m20261123_000001_initial;
mod m20261123_000002_billing;
mod m20261123_000003_security;
mod m20261123_000004_scheduling;
mod m20261123_000005_secrets;
mod m20261123_000006_org_pool;
mod m20261123_000007_org_strategy_override;

pub use m20261123_000002_billing::DEFAULT_PLAN_ID;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261123_000001_initial::Migration),
            Box::new(m20261123_000002_billing::Migration),
            Box::new(m20261123_000003_security::Migration),
            Box::new(m20261123_000004_scheduling::Migration),
            Box::new(m20261123_000005_secrets::Migration),
            Box::new(m20261123_000006_org_pool::Migration),
            Box::new(m20261123_000007_org_strategy_override::Migration),
        ]
    }
}
