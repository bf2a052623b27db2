//! Billing: price plans, each org's plan, quota, exemption and grace
//! deadline, the metered period of usage entries (with the sub-micro-unit
//! carry, so rounding never loses or invents money across restarts), and
//! the record of billing-status transitions.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum PricePlans {
    Table,
    Id,
    Name,
    CpuMicrosPerVcpuHour,
    MemoryMicrosPerGibHour,
    StoppedMemoryMicrosPerGibHour,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Orgs {
    Table,
    PlanId,
    BillingExempt,
    GraceDeadline,
    MaxSandboxes,
    MaxCpuMillis,
    MaxMemoryMb,
    MaxTtlSeconds,
}

#[derive(DeriveIden)]
enum LedgerEntries {
    Table,
    OrgId,
    SandboxId,
    Kind,
    PeriodStart,
    PeriodEnd,
    Carry,
}

#[derive(DeriveIden)]
enum BillingEvents {
    Table,
    Id,
    OrgId,
    FromStatus,
    ToStatus,
    BalanceMicros,
    Reason,
    CreatedAt,
}

/// The plan every org is on unless an admin says otherwise.
pub const DEFAULT_PLAN_ID: &str = "plan_default";

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
                    .table(PricePlans::Table)
                    .col(
                        ColumnDef::new(PricePlans::Id)
                            .string_len(64)
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(PricePlans::Name)
                            .string_len(64)
                            .not_null()
                            .unique_key(),
                    )
                    .col(
                        ColumnDef::new(PricePlans::CpuMicrosPerVcpuHour)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(PricePlans::MemoryMicrosPerGibHour)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(PricePlans::StoppedMemoryMicrosPerGibHour)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(PricePlans::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        // 0.0504 per vCPU-hour and 0.0162 per GiB-hour in micro-units; a
        // stopped sandbox is free unless a plan says otherwise.
        manager
            .exec_stmt(
                Query::insert()
                    .into_table(PricePlans::Table)
                    .columns([
                        PricePlans::Id,
                        PricePlans::Name,
                        PricePlans::CpuMicrosPerVcpuHour,
                        PricePlans::MemoryMicrosPerGibHour,
                        PricePlans::StoppedMemoryMicrosPerGibHour,
                        PricePlans::CreatedAt,
                    ])
                    .values_panic([
                        DEFAULT_PLAN_ID.into(),
                        "default".into(),
                        50_400i64.into(),
                        16_200i64.into(),
                        0i64.into(),
                        Expr::current_timestamp().into(),
                    ])
                    .to_owned(),
            )
            .await?;

        // SQLite adds one column per ALTER TABLE.
        let org_columns = [
            ColumnDef::new(Orgs::PlanId)
                .string_len(64)
                .null()
                .to_owned(),
            ColumnDef::new(Orgs::BillingExempt)
                .boolean()
                .not_null()
                .default(false)
                .to_owned(),
            timestamp_null(Orgs::GraceDeadline),
            ColumnDef::new(Orgs::MaxSandboxes)
                .big_integer()
                .null()
                .to_owned(),
            ColumnDef::new(Orgs::MaxCpuMillis)
                .big_integer()
                .null()
                .to_owned(),
            ColumnDef::new(Orgs::MaxMemoryMb)
                .big_integer()
                .null()
                .to_owned(),
            ColumnDef::new(Orgs::MaxTtlSeconds)
                .big_integer()
                .null()
                .to_owned(),
        ];
        for mut column in org_columns {
            manager
                .alter_table(
                    Table::alter()
                        .table(Orgs::Table)
                        .add_column(&mut column)
                        .to_owned(),
                )
                .await?;
        }
        let entry_columns = [
            timestamp_null(LedgerEntries::PeriodStart),
            timestamp_null(LedgerEntries::PeriodEnd),
            ColumnDef::new(LedgerEntries::Carry)
                .big_integer()
                .null()
                .to_owned(),
        ];
        for mut column in entry_columns {
            manager
                .alter_table(
                    Table::alter()
                        .table(LedgerEntries::Table)
                        .add_column(&mut column)
                        .to_owned(),
                )
                .await?;
        }
        // Usage of one sandbox in period order (metering resumes from it).
        manager
            .create_index(
                Index::create()
                    .name("idx_ledger_sandbox_period")
                    .table(LedgerEntries::Table)
                    .col(LedgerEntries::SandboxId)
                    .col(LedgerEntries::Kind)
                    .col(LedgerEntries::PeriodEnd)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_ledger_org_period")
                    .table(LedgerEntries::Table)
                    .col(LedgerEntries::OrgId)
                    .col(LedgerEntries::PeriodStart)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(BillingEvents::Table)
                    .col(
                        ColumnDef::new(BillingEvents::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(BillingEvents::OrgId)
                            .string_len(64)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(BillingEvents::FromStatus)
                            .string_len(16)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(BillingEvents::ToStatus)
                            .string_len(16)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(BillingEvents::BalanceMicros)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(BillingEvents::Reason).text().not_null())
                    .col(
                        ColumnDef::new(BillingEvents::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_billing_events_org")
                    .table(BillingEvents::Table)
                    .col(BillingEvents::OrgId)
                    .col(BillingEvents::Id)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(BillingEvents::Table).to_owned())
            .await?;
        for index in ["idx_ledger_org_period", "idx_ledger_sandbox_period"] {
            manager
                .drop_index(
                    Index::drop()
                        .name(index)
                        .table(LedgerEntries::Table)
                        .to_owned(),
                )
                .await?;
        }
        for column in [
            LedgerEntries::Carry,
            LedgerEntries::PeriodEnd,
            LedgerEntries::PeriodStart,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(LedgerEntries::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        for column in [
            Orgs::MaxTtlSeconds,
            Orgs::MaxMemoryMb,
            Orgs::MaxCpuMillis,
            Orgs::MaxSandboxes,
            Orgs::GraceDeadline,
            Orgs::BillingExempt,
            Orgs::PlanId,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Orgs::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .drop_table(Table::drop().table(PricePlans::Table).to_owned())
            .await
    }
}
