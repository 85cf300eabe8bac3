"""Options per job and pictures from the client: where the picture comes from, the job's resolution, face limit
and size, and the report of its mesh. `prompt` may be NULL now (an uploaded picture without a caption).

Revision ID: 0004
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every job stored so far was made from a prompt; their options stay NULL (the service's defaults).
    op.add_column("jobs", sa.Column("source", sa.String(16), nullable=False, server_default=sa.text("'prompt'")))
    op.add_column("jobs", sa.Column("resolution", sa.Integer))
    op.add_column("jobs", sa.Column("face_limit", sa.Integer))
    op.add_column("jobs", sa.Column("size_m", sa.Float))
    op.add_column("jobs", sa.Column("mesh", sa.JSON))
    # SQLite cannot drop a NOT NULL in place: batch mode copies the table, its partial index `jobs_active` included
    # with its WHERE clause (PostgreSQL alters the column in place).
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("prompt", existing_type=sa.Text, nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("prompt", existing_type=sa.Text, nullable=False)
        for column in ("mesh", "size_m", "face_limit", "resolution", "source"):
            batch.drop_column(column)
