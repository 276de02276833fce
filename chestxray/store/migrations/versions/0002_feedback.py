"""Readers' feedback: agree/disagree per finding and the true labels.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("analysis_id", sa.Integer(), sa.ForeignKey("analyses.id", ondelete="CASCADE"), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("agree", sa.Boolean(), nullable=True),
        sa.Column("truth", sa.String(16), nullable=True),
        sa.Column("reader", sa.String(80), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("analysis_id", "label", name="uq_feedback_analysis_label"),
    )
    op.create_index("ix_feedback_analysis_id", "feedback", ["analysis_id"])


def downgrade() -> None:
    op.drop_index("ix_feedback_analysis_id", table_name="feedback")
    op.drop_table("feedback")
