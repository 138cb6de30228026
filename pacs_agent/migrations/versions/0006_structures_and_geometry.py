"""slice geometry of CT instances, segmentation summaries, structure notes and input warnings of studies

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("image_position", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("segmentation_summary", sa.Text(), nullable=True))
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(sa.Column("image_orientation", sa.String(length=200), nullable=True))
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("structure_notes", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("input_warnings", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("input_warnings")
        batch_op.drop_column("structure_notes")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("image_orientation")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("segmentation_summary")
        batch_op.drop_column("image_position")
