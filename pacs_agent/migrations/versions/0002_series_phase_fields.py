"""series phase fields and study series notes (portal-venous routing)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(sa.Column("protocol_name", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("image_comments", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("contrast_bolus_agent", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("contrast_start_time", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("acquisition_time", sa.String(length=16), nullable=True))
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("series_notes", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("series_notes")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("acquisition_time")
        batch_op.drop_column("contrast_start_time")
        batch_op.drop_column("contrast_bolus_agent")
        batch_op.drop_column("image_comments")
        batch_op.drop_column("protocol_name")
