"""Analyses and their per-label answers.

Revision ID: 0001
Revises:
Create Date: 2026-12-05
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "analyses",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("result_id", sa.String(32), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=True),
        sa.Column("model_hash", sa.String(64), nullable=True),
        sa.Column("backend", sa.String(40), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(80), nullable=True),
        sa.Column("in_scope", sa.Boolean(), nullable=True),
        sa.Column("scope_score", sa.Float(), nullable=True),
        sa.Column("scope_limit", sa.Float(), nullable=True),
        sa.Column("orientation", sa.String(40), nullable=True),
        sa.Column("image_format", sa.String(8), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("bit_depth", sa.Integer(), nullable=True),
        sa.Column("photometric", sa.String(16), nullable=True),
        sa.Column("brightness", sa.Float(), nullable=True),
        sa.Column("contrast", sa.Float(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.UniqueConstraint("result_id", name="uq_analyses_result_id"),
    )
    op.create_index("ix_analyses_created", "analyses", ["created"])
    op.create_table(
        "analysis_labels",
        sa.Column("analysis_id", sa.Integer(), sa.ForeignKey("analyses.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("label", sa.String(64), primary_key=True),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("call", sa.String(16), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("analysis_labels")
    op.drop_index("ix_analyses_created", table_name="analyses")
    op.drop_table("analyses")
