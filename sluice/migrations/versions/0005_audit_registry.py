"""Audit chain registry: one row per chain with its head (last seq, last hash) and a MAC.

Chains are keyed from here on (HMAC-SHA256 with a key outside the database); the registry
lets `sluice audit verify` find cut tails and deleted chains (sluice/gateway/ledger/chain.py).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_chains",
        sa.Column("instance_id", sa.String(64), primary_key=True),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("last_hash", sa.String(64), nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        # Chains from before this revision are unkeyed up to legacy_until (seal-legacy).
        sa.Column("legacy_until", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("legacy_mac", sa.String(64)),
    )


def downgrade() -> None:
    op.drop_table("audit_chains")
