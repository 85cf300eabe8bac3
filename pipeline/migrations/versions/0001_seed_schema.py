"""The schema the seed created by hand (CREATE TABLE IF NOT EXISTS), as the first revision.

A data folder made by the seed's code has exactly this table and no alembic_version: `pipeline.db.migrate` stamps it
with this revision instead of running it.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ACTIVE = sa.text("status IN ('queued', 'processing')")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("job_id", sa.String(8), primary_key=True),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("progress", sa.Integer, nullable=False),
        sa.Column("created_at", sa.String(26), nullable=False),
        sa.Column("updated_at", sa.String(26), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("model_version", sa.Text),
        sa.Column("owner", sa.Text),
        sa.Column("lease_until", sa.Float),
    )
    op.create_index("jobs_active", "jobs", ["created_at"], sqlite_where=ACTIVE, postgresql_where=ACTIVE)


def downgrade() -> None:
    op.drop_index("jobs_active", table_name="jobs")
    op.drop_table("jobs")
