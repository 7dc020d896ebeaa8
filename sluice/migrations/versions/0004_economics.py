"""Money: versioned model prices, budgets, and the exact cost of every usage row and rollup.

Costs are integer pico-units (1e-12 of the currency): tokens x price in micro-units per
million tokens, exact (sluice/gateway/economics/__init__.py).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

AutoBigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "model_prices",
        sa.Column("id", AutoBigInt, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("effective_from", TS, nullable=False),
        sa.Column("input_micros", sa.BigInteger, nullable=False),
        sa.Column("output_micros", sa.BigInteger, nullable=False),
        sa.Column("cached_input_micros", sa.BigInteger, nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_model_prices_model_from", "model_prices", ["model", "effective_from"])
    op.create_table(
        "budgets",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(32)),
        sa.Column("period", sa.String(8), nullable=False),
        sa.Column("limit_micros", sa.BigInteger, nullable=False),
        sa.Column("mode", sa.String(8), nullable=False),
        sa.Column("thresholds", sa.JSON, nullable=False),
        sa.Column("webhook_url", sa.String(2048)),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_budgets_tenant", "budgets", ["tenant_id"])
    with op.batch_alter_table("usage_events") as batch:
        batch.add_column(sa.Column("cost_pico", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("backend", sa.String(64)))
    with op.batch_alter_table("usage_daily") as batch:
        batch.add_column(sa.Column("cost_pico", sa.BigInteger, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("usage_daily") as batch:
        batch.drop_column("cost_pico")
    with op.batch_alter_table("usage_events") as batch:
        batch.drop_column("backend")
        batch.drop_column("cost_pico")
    op.drop_index("ix_budgets_tenant", table_name="budgets")
    op.drop_table("budgets")
    op.drop_index("ix_model_prices_model_from", table_name="model_prices")
    op.drop_table("model_prices")
