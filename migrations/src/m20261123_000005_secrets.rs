//! Sandbox secrets and hardening: `sandboxes.secret_env` (env values the
//! owner marked secret, each sealed with the control plane's secret key:
//! `{"KEY": "v1:<hex>"}`, never plaintext) and `sandboxes.security` (the
//! hardening options chosen at create: network, read-only root, pids limit,
//! user namespace). Both null on existing rows: no secrets, the defaults.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Sandboxes {
    Table,
    SecretEnv,
    Security,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // SQLite takes one column per ALTER TABLE.
        for column in [Sandboxes::SecretEnv, Sandboxes::Security] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Sandboxes::Table)
                        .add_column(ColumnDef::new(column).json().null())
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [Sandboxes::Security, Sandboxes::SecretEnv] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Sandboxes::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
