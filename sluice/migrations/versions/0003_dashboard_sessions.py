"""Dashboard sessions revoked by logout (kept until their token would have expired).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "dashboard_revoked_sessions",
        sa.Column("sid", sa.String(64), primary_key=True),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=False),
    )
    op.create_index("ix_dashboard_revoked_sessions_expires_at", "dashboard_revoked_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_dashboard_revoked_sessions_expires_at", table_name="dashboard_revoked_sessions")
    op.drop_table("dashboard_revoked_sessions")
