//! The org-level placement setting: `orgs.private_pool_only` (false by
//! default), set by the platform admin. When true, every sandbox of the org
//! is placed only on the hosts of its private pool, whatever the request
//! asks.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Orgs {
    Table,
    PrivatePoolOnly,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Orgs::Table)
                    .add_column(
                        ColumnDef::new(Orgs::PrivatePoolOnly)
                            .boolean()
                            .not_null()
                            .default(false),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Orgs::Table)
                    .drop_column(Orgs::PrivatePoolOnly)
                    .to_owned(),
            )
            .await
    }
}
