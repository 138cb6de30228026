"""study pairing for the 8-week response method; the inputs chosen by readiness

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ct_series_instance_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("segmentation_sop_instance_uid", sa.String(length=64), nullable=True))
    op.create_table(
        "pairings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("followup_study_id", sa.Integer(), nullable=False),
        sa.Column("baseline_study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["followup_study_id"], ["studies.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("followup_study_id"),
    )


def downgrade() -> None:
    op.drop_table("pairings")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("segmentation_sop_instance_uid")
        batch_op.drop_column("ct_series_instance_uid")
