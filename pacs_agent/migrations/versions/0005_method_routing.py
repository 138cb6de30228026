"""body region fields for method routing; why a method was skipped

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(sa.Column("body_part_examined", sa.String(length=16), nullable=True))
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("study_description", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("method_notes", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("method_notes")
        batch_op.drop_column("study_description")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("body_part_examined")
