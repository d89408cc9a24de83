"""model preprocessing (fitted per-column encoding) and evaluation report

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 12:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("trained_models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("preprocessing", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("evaluation", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trained_models", schema=None) as batch_op:
        batch_op.drop_column("evaluation")
        batch_op.drop_column("preprocessing")
