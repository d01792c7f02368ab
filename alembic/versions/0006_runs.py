"""runs: one row per ingesting process or replay, with the update-id ranges it wrote.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    tstz = sa.DateTime(timezone=True)
    op.create_table(
        "runs",
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("file_path", sa.Text(), nullable=True),
        sa.Column("file_sha256", sa.Text(), nullable=True),
        sa.Column("symbols", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", tstz, server_default=sa.func.now(), nullable=False),
        sa.Column("last_seen_at", tstz, server_default=sa.func.now(), nullable=False),
        sa.Column("ended_at", tstz, nullable=True),
        sa.Column("update_ids", postgresql.JSONB(), server_default=sa.text("'{}'"), nullable=False),
    )
    op.create_index("ix_runs_started_at", "runs", ["started_at"])
    op.create_index("ix_runs_file_sha256", "runs", ["file_sha256"])


def downgrade() -> None:
    op.drop_table("runs")
