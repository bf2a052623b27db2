//! Scheduling: host labels, private pools and operator state; the restart
//! policy and placement constraints of each sandbox.
//!
//! - `hosts.labels` (JSON map, reported by the agent), `hosts.org_id` (set
//!   for a host of an org's private pool, from its host token) and
//!   `hosts.admin_state` (`active`, `cordoned`, `draining`,
//!   `decommissioned`: what operators decided, beside the connection
//!   state in `hosts.state`).
//! - `host_tokens.org_id`: a token issued for an org's private pool.
//! - `sandboxes.restart_policy` (`never` or `on_host_loss`) and
//!   `sandboxes.placement` (the constraints it was placed with, reused when
//!   it is placed again).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Hosts {
    Table,
    Labels,
    OrgId,
    AdminState,
}

#[derive(DeriveIden)]
enum HostTokens {
    Table,
    OrgId,
}

#[derive(DeriveIden)]
enum Sandboxes {
    Table,
    RestartPolicy,
    Placement,
}

async fn add(
    manager: &SchemaManager<'_>,
    table: impl IntoIden + 'static,
    mut column: ColumnDef,
) -> Result<(), DbErr> {
    manager
        .alter_table(
            Table::alter()
                .table(table)
                .add_column(&mut column)
                .to_owned(),
        )
        .await
}

async fn drop_col(
    manager: &SchemaManager<'_>,
    table: impl IntoIden + 'static,
    column: impl IntoIden + 'static,
) -> Result<(), DbErr> {
    manager
        .alter_table(Table::alter().table(table).drop_column(column).to_owned())
        .await
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // SQLite takes one column per ALTER TABLE.
        add(
            manager,
            Hosts::Table,
            ColumnDef::new(Hosts::Labels).json().null().to_owned(),
        )
        .await?;
        add(
            manager,
            Hosts::Table,
            ColumnDef::new(Hosts::OrgId)
                .string_len(64)
                .null()
                .to_owned(),
        )
        .await?;
        add(
            manager,
            Hosts::Table,
            ColumnDef::new(Hosts::AdminState)
                .string_len(16)
                .not_null()
                .default("active")
                .to_owned(),
        )
        .await?;
        add(
            manager,
            HostTokens::Table,
            ColumnDef::new(HostTokens::OrgId)
                .string_len(64)
                .null()
                .to_owned(),
        )
        .await?;
        add(
            manager,
            Sandboxes::Table,
            ColumnDef::new(Sandboxes::RestartPolicy)
                .string_len(16)
                .not_null()
                .default("never")
                .to_owned(),
        )
        .await?;
        add(
            manager,
            Sandboxes::Table,
            ColumnDef::new(Sandboxes::Placement)
                .json()
                .null()
                .to_owned(),
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        drop_col(manager, Sandboxes::Table, Sandboxes::Placement).await?;
        drop_col(manager, Sandboxes::Table, Sandboxes::RestartPolicy).await?;
        drop_col(manager, HostTokens::Table, HostTokens::OrgId).await?;
        drop_col(manager, Hosts::Table, Hosts::AdminState).await?;
        drop_col(manager, Hosts::Table, Hosts::OrgId).await?;
        drop_col(manager, Hosts::Table, Hosts::Labels).await
    }
}
