"""Fenced leases: each claim of a job gets the next attempt number, and every write of a running job names it.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Jobs that were running under the seed's code (a claim without a number) count as attempt 0.
    op.add_column("jobs", sa.Column("attempt", sa.Integer, nullable=False, server_default=sa.text("0")))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("attempt")
