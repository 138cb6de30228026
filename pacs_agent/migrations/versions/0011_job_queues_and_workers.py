"""job queues (method -> queue), the queue engine's job id, the workers table; procrastinate's schema on PostgreSQL

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02

On PostgreSQL the jobs are handed to procrastinate (:mod:`pacs_agent.jobs.engine`); its tables and
functions (``procrastinate_*``) are created here, in the same database, so that a job is deferred in
the transaction that records it. SQLite needs nothing more (the in-process queue is the jobs table).
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("queue", sa.String(length=32), nullable=False, server_default="default"))
        batch.add_column(sa.Column("queue_job_id", sa.BigInteger(), nullable=True))
    op.create_table(
        "workers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("host", sa.String(length=128), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("queues", sa.Text(), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("backend", sa.String(length=16), nullable=False),
        sa.Column("queue_worker_id", sa.BigInteger(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("current_job_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        from pacs_agent.jobs.engine import apply_engine_schema, defer_open_jobs

        apply_engine_schema(bind)
        defer_open_jobs(bind)  # jobs waiting at the upgrade: into the queue engine, nothing left behind


def downgrade() -> None:
    op.drop_table("workers")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("queue_job_id")
        batch.drop_column("queue")
