//! Organisations, credentials, hosts, sandboxes and the ledger.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Orgs {
    Table,
    Id,
    Name,
    BillingStatus,
    CreatedAt,
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
    OrgId,
    Name,
    Prefix,
    SecretHash,
    CreatedAt,
    LastUsedAt,
    RevokedAt,
}

#[derive(DeriveIden)]
enum HostTokens {
    Table,
    Id,
    HostId,
    Name,
    Prefix,
    SecretHash,
    CreatedAt,
    RevokedAt,
}

#[derive(DeriveIden)]
enum Hosts {
    Table,
    Id,
    Hostname,
    State,
    Runtime,
    Isolated,
    CpuMillis,
    MemoryMb,
    Images,
    AgentVersion,
    LastSeenAt,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Sandboxes {
    Table,
    Id,
    OrgId,
    HostId,
    Name,
    Image,
    Command,
    Env,
    Labels,
    Workdir,
    CpuMillis,
    MemoryMb,
    TtlSeconds,
    State,
    DesiredState,
    FailureReason,
    ExitCode,
    CreatedAt,
    UpdatedAt,
    StartedAt,
    ExpiresAt,
}

#[derive(DeriveIden)]
enum LedgerEntries {
    Table,
    Id,
    OrgId,
    Kind,
    AmountMicros,
    IdempotencyKey,
    SandboxId,
    Description,
    CreatedAt,
}

fn text_pk<T: IntoIden>(col: T) -> ColumnDef {
    ColumnDef::new(col)
        .string_len(64)
        .not_null()
        .primary_key()
        .to_owned()
}

fn timestamp<T: IntoIden>(col: T) -> ColumnDef {
    ColumnDef::new(col)
        .timestamp_with_time_zone()
        .not_null()
        .to_owned()
}

fn timestamp_null<T: IntoIden>(col: T) -> ColumnDef {
    ColumnDef::new(col)
        .timestamp_with_time_zone()
        .null()
        .to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Orgs::Table)
                    .col(text_pk(Orgs::Id))
                    .col(
                        ColumnDef::new(Orgs::Name)
                            .string_len(128)
                            .not_null()
                            .unique_key(),
                    )
                    .col(
                        ColumnDef::new(Orgs::BillingStatus)
                            .string_len(16)
                            .not_null(),
                    )
                    .col(timestamp(Orgs::CreatedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(ApiKeys::Table)
                    .col(text_pk(ApiKeys::Id))
                    .col(ColumnDef::new(ApiKeys::OrgId).string_len(64).not_null())
                    .col(ColumnDef::new(ApiKeys::Name).string_len(128).not_null())
                    .col(ColumnDef::new(ApiKeys::Prefix).string_len(32).not_null())
                    .col(
                        ColumnDef::new(ApiKeys::SecretHash)
                            .string_len(64)
                            .not_null()
                            .unique_key(),
                    )
                    .col(timestamp(ApiKeys::CreatedAt))
                    .col(timestamp_null(ApiKeys::LastUsedAt))
                    .col(timestamp_null(ApiKeys::RevokedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(ApiKeys::Table, ApiKeys::OrgId)
                            .to(Orgs::Table, Orgs::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_api_keys_org")
                    .table(ApiKeys::Table)
                    .col(ApiKeys::OrgId)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(HostTokens::Table)
                    .col(text_pk(HostTokens::Id))
                    .col(ColumnDef::new(HostTokens::HostId).string_len(64).not_null())
                    .col(ColumnDef::new(HostTokens::Name).string_len(128).not_null())
                    .col(ColumnDef::new(HostTokens::Prefix).string_len(32).not_null())
                    .col(
                        ColumnDef::new(HostTokens::SecretHash)
                            .string_len(64)
                            .not_null()
                            .unique_key(),
                    )
                    .col(timestamp(HostTokens::CreatedAt))
                    .col(timestamp_null(HostTokens::RevokedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Hosts::Table)
                    .col(text_pk(Hosts::Id))
                    .col(ColumnDef::new(Hosts::Hostname).string_len(255).not_null())
                    .col(ColumnDef::new(Hosts::State).string_len(16).not_null())
                    .col(ColumnDef::new(Hosts::Runtime).string_len(16).not_null())
                    .col(ColumnDef::new(Hosts::Isolated).boolean().not_null())
                    .col(ColumnDef::new(Hosts::CpuMillis).big_integer().not_null())
                    .col(ColumnDef::new(Hosts::MemoryMb).big_integer().not_null())
                    .col(ColumnDef::new(Hosts::Images).json().not_null())
                    .col(
                        ColumnDef::new(Hosts::AgentVersion)
                            .string_len(64)
                            .not_null(),
                    )
                    .col(timestamp_null(Hosts::LastSeenAt))
                    .col(timestamp(Hosts::CreatedAt))
                    .col(timestamp(Hosts::UpdatedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Sandboxes::Table)
                    .col(text_pk(Sandboxes::Id))
                    .col(ColumnDef::new(Sandboxes::OrgId).string_len(64).not_null())
                    .col(ColumnDef::new(Sandboxes::HostId).string_len(64).null())
                    .col(ColumnDef::new(Sandboxes::Name).string_len(64).null())
                    .col(ColumnDef::new(Sandboxes::Image).string_len(128).not_null())
                    .col(ColumnDef::new(Sandboxes::Command).json().not_null())
                    .col(ColumnDef::new(Sandboxes::Env).json().not_null())
                    .col(ColumnDef::new(Sandboxes::Labels).json().not_null())
                    .col(ColumnDef::new(Sandboxes::Workdir).string_len(1024).null())
                    .col(
                        ColumnDef::new(Sandboxes::CpuMillis)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(Sandboxes::MemoryMb).big_integer().not_null())
                    .col(ColumnDef::new(Sandboxes::TtlSeconds).big_integer().null())
                    .col(ColumnDef::new(Sandboxes::State).string_len(16).not_null())
                    .col(
                        ColumnDef::new(Sandboxes::DesiredState)
                            .string_len(16)
                            .not_null(),
                    )
                    .col(ColumnDef::new(Sandboxes::FailureReason).text().null())
                    .col(ColumnDef::new(Sandboxes::ExitCode).integer().null())
                    .col(timestamp(Sandboxes::CreatedAt))
                    .col(timestamp(Sandboxes::UpdatedAt))
                    .col(timestamp_null(Sandboxes::StartedAt))
                    .col(timestamp_null(Sandboxes::ExpiresAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Sandboxes::Table, Sandboxes::OrgId)
                            .to(Orgs::Table, Orgs::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_sandboxes_org_id")
                    .table(Sandboxes::Table)
                    .col(Sandboxes::OrgId)
                    .col(Sandboxes::Id)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_sandboxes_host_state")
                    .table(Sandboxes::Table)
                    .col(Sandboxes::HostId)
                    .col(Sandboxes::State)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(LedgerEntries::Table)
                    .col(
                        ColumnDef::new(LedgerEntries::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(LedgerEntries::OrgId)
                            .string_len(64)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(LedgerEntries::Kind)
                            .string_len(16)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(LedgerEntries::AmountMicros)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(LedgerEntries::IdempotencyKey)
                            .string_len(255)
                            .not_null()
                            .unique_key(),
                    )
                    .col(
                        ColumnDef::new(LedgerEntries::SandboxId)
                            .string_len(64)
                            .null(),
                    )
                    .col(ColumnDef::new(LedgerEntries::Description).text().not_null())
                    .col(timestamp(LedgerEntries::CreatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(LedgerEntries::Table, LedgerEntries::OrgId)
                            .to(Orgs::Table, Orgs::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_ledger_org_id")
                    .table(LedgerEntries::Table)
                    .col(LedgerEntries::OrgId)
                    .col(LedgerEntries::Id)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            LedgerEntries::Table.into_iden(),
            Sandboxes::Table.into_iden(),
            Hosts::Table.into_iden(),
            HostTokens::Table.into_iden(),
            ApiKeys::Table.into_iden(),
            Orgs::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}
