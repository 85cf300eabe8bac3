"""The job life cycle (issue 15): cancel requests, deletions under way, webhooks and their outbox, the state-change
log behind the Server-Sent Events, and idempotency keys.

Revision ID: 0005
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("callback_url", sa.Text))
        batch.add_column(sa.Column("webhook_status", sa.String(16)))
        batch.add_column(sa.Column("cancel_requested", sa.Integer, nullable=False, server_default=sa.text("0")))
        batch.add_column(sa.Column("deleting", sa.Integer, nullable=False, server_default=sa.text("0")))
        batch.add_column(sa.Column("events", sa.Integer, nullable=False, server_default=sa.text("0")))
    op.create_index("jobs_by_created", "jobs", ["created_at", "job_id"])
    op.create_table(
        "job_events",
        sa.Column("job_id", sa.String(8), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("data", sa.Text, nullable=False),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("webhook_id", sa.String(40), primary_key=True),
        sa.Column("job_id", sa.String(8), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("give_up_at", sa.Float, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("last_error", sa.Text),
    )
    op.create_index("ix_webhook_deliveries_job_id", "webhook_deliveries", ["job_id"])
    op.create_index("webhook_deliveries_due", "webhook_deliveries", ["state", "next_attempt_at"])
    op.create_table(
        "idempotency_keys",
        sa.Column("scope", sa.String(255), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(8), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_index("webhook_deliveries_due", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_job_id", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_table("job_events")
    op.drop_index("jobs_by_created", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for name in ("events", "deleting", "cancel_requested", "webhook_status", "callback_url"):
            batch.drop_column(name)
