//! Security: API-key roles and expiry, host-token expiry, and the audit log
//! of every mutating request.
//!
//! Existing keys become `admin`: before roles existed every key could do
//! everything in its org, so that is what they keep.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Role,
    ExpiresAt,
}

#[derive(DeriveIden)]
enum HostTokens {
    Table,
    ExpiresAt,
}

#[derive(DeriveIden)]
enum AuditEvents {
    Table,
    Id,
    OrgId,
    Actor,
    Action,
    Method,
    Path,
    TargetId,
    Status,
    SourceAddr,
    RequestId,
    CreatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // SQLite takes one column per ALTER TABLE.
        let key_columns = [
            ColumnDef::new(ApiKeys::Role)
                .string_len(16)
                .not_null()
                .default("admin")
                .to_owned(),
            ColumnDef::new(ApiKeys::ExpiresAt)
                .timestamp_with_time_zone()
                .null()
                .to_owned(),
        ];
        for mut column in key_columns {
            manager
                .alter_table(
                    Table::alter()
                        .table(ApiKeys::Table)
                        .add_column(&mut column)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .alter_table(
                Table::alter()
                    .table(HostTokens::Table)
                    .add_column(
                        ColumnDef::new(HostTokens::ExpiresAt)
                            .timestamp_with_time_zone()
                            .null()
                            .to_owned(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AuditEvents::Table)
                    .col(
                        ColumnDef::new(AuditEvents::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(AuditEvents::OrgId).string_len(64).null())
                    .col(ColumnDef::new(AuditEvents::Actor).string_len(64).not_null())
                    .col(
                        ColumnDef::new(AuditEvents::Action)
                            .string_len(128)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(AuditEvents::Method)
                            .string_len(16)
                            .not_null(),
                    )
                    .col(ColumnDef::new(AuditEvents::Path).string_len(512).not_null())
                    .col(ColumnDef::new(AuditEvents::TargetId).string_len(64).null())
                    .col(ColumnDef::new(AuditEvents::Status).integer().not_null())
                    .col(
                        ColumnDef::new(AuditEvents::SourceAddr)
                            .string_len(64)
                            .null(),
                    )
                    .col(
                        ColumnDef::new(AuditEvents::RequestId)
                            .string_len(128)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(AuditEvents::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        // An org's events in order (its audit listing pages by id).
        manager
            .create_index(
                Index::create()
                    .name("idx_audit_org_id")
                    .table(AuditEvents::Table)
                    .col(AuditEvents::OrgId)
                    .col(AuditEvents::Id)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(AuditEvents::Table).to_owned())
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(HostTokens::Table)
                    .drop_column(HostTokens::ExpiresAt)
                    .to_owned(),
            )
            .await?;
        for column in [ApiKeys::ExpiresAt, ApiKeys::Role] {
            manager
                .alter_table(
                    Table::alter()
                        .table(ApiKeys::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
