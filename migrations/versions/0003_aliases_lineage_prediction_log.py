"""model aliases and their history, warm-start parents, the prediction log (with shadow answers)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 12:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_aliases",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("alias", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", "alias", name=op.f("pk_model_aliases")),
    )
    op.create_table(
        "model_alias_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("alias", sa.String(length=32), nullable=False),
        sa.Column("from_version", sa.Integer(), nullable=True),
        sa.Column("to_version", sa.Integer(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("who", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_alias_events")),
    )
    with op.batch_alter_table("model_alias_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_alias_events_name"), ["name"], unique=False)
    op.create_table(
        "prediction_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("inputs", sa.JSON(), nullable=False),
        sa.Column("outputs", sa.JSON(), nullable=False),
        sa.Column("request_id", sa.String(length=32), nullable=True),
        sa.Column("role", sa.String(length=8), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prediction_log")),
    )
    with op.batch_alter_table("prediction_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_prediction_log_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_prediction_log_model_id"), ["model_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_prediction_log_request_id"), ["request_id"], unique=False)
    with op.batch_alter_table("trained_models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parent_model_id", sa.String(length=32), nullable=True))
        batch_op.create_index(batch_op.f("ix_trained_models_parent_model_id"), ["parent_model_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("trained_models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_trained_models_parent_model_id"))
        batch_op.drop_column("parent_model_id")
    with op.batch_alter_table("prediction_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_prediction_log_request_id"))
        batch_op.drop_index(batch_op.f("ix_prediction_log_model_id"))
        batch_op.drop_index(batch_op.f("ix_prediction_log_created_at"))
    op.drop_table("prediction_log")
    with op.batch_alter_table("model_alias_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_alias_events_name"))
    op.drop_table("model_alias_events")
    op.drop_table("model_aliases")
