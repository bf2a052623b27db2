//! The org-level permission to choose the placement strategy per request:
//! `orgs.allow_strategy_override`, NULL (the deployment's default,
//! `--no-strategy-override`), true or false, set by the platform admin.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Orgs {
    Table,
    AllowStrategyOverride,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Orgs::Table)
                    .add_column(ColumnDef::new(Orgs::AllowStrategyOverride).boolean().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Orgs::Table)
                    .drop_column(Orgs::AllowStrategyOverride)
                    .to_owned(),
            )
            .await
    }
}
