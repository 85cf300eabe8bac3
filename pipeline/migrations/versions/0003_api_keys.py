"""API keys, the counters of their rate limits, and the key that owns each job.

Jobs stored before this revision keep a null `api_key_id`: they were submitted in open mode, and in keys mode no
key sees them.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("rpm", sa.Integer, nullable=False),
        sa.Column("max_in_flight", sa.Integer, nullable=False),
        sa.Column("jobs_per_day", sa.Integer, nullable=False),
        sa.Column("created_at", sa.String(26), nullable=False),
        sa.Column("revoked_at", sa.String(26)),
    )
    op.create_table(
        "rate_limits",
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("hits", sa.Integer, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.add_column("jobs", sa.Column("api_key_id", sa.Integer))
    op.create_index("jobs_by_key", "jobs", ["api_key_id", "created_at"])
    op.create_index("jobs_created", "jobs", ["created_at"])


def downgrade() -> None:
    op.drop_index("jobs_created", table_name="jobs")
    op.drop_index("jobs_by_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("api_key_id")
    op.drop_table("rate_limits")
    op.drop_table("api_keys")
