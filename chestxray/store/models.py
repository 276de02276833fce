"""The results database's tables (SQLAlchemy 2.x ORM): one row per analysis, its per-label answers, and feedback.

No patient data by design: no column holds a name, an ID, a date of birth, an accession number or a file name.
An analysis is described by technical facts only (format, size, bit depth, photometric interpretation) and by what
the model answered. The schema is made and changed by the Alembic migrations in migrations/, never by
`metadata.create_all`: a test compares the two.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SOURCES = ("web", "api", "dicom", "cli", "replay")  # replay: the drift benchmark's streams
OUTCOMES = ("answered", "refused", "failed")  # refused: bad input (reason says which); failed: an error on our side
TRUTHS = ("present", "absent")  # a reader's true label; no row (or NULL) = not assessed


class Base(DeclarativeBase):
    pass


class Analysis(Base):
    """One image analysed (or refused) by any entry point."""

    __tablename__ = "analyses"
    __table_args__ = (UniqueConstraint("result_id", name="uq_analyses_result_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[str | None] = mapped_column(String(32))  # the saved result folder; None if refused
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    source: Mapped[str] = mapped_column(String(16))
    model_name: Mapped[str | None] = mapped_column(String(200))  # checkpoint file name, arch and input size
    model_hash: Mapped[str | None] = mapped_column(String(64))  # SHA-256 of the checkpoint file
    backend: Mapped[str | None] = mapped_column(String(40))
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(80))  # why refused or failed: a category, never input text
    in_scope: Mapped[bool | None] = mapped_column(Boolean)
    scope_score: Mapped[float | None] = mapped_column(Float)
    scope_limit: Mapped[float | None] = mapped_column(Float)
    orientation: Mapped[str | None] = mapped_column(String(40))
    image_format: Mapped[str | None] = mapped_column(String(8))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    bit_depth: Mapped[int | None] = mapped_column(Integer)
    photometric: Mapped[str | None] = mapped_column(String(16))
    brightness: Mapped[float | None] = mapped_column(Float)  # mean of the model's input in [0, 1]
    contrast: Mapped[float | None] = mapped_column(Float)  # its standard deviation
    latency_ms: Mapped[float | None] = mapped_column(Float)

    labels: Mapped[list[LabelAnswer]] = relationship(back_populates="analysis", cascade="all, delete-orphan",
                                                     passive_deletes=True, order_by="LabelAnswer.position")
    feedback: Mapped[list[Feedback]] = relationship(back_populates="analysis", cascade="all, delete-orphan",
                                                    passive_deletes=True)


class LabelAnswer(Base):
    """One label's calibrated probability and call for one analysis."""

    __tablename__ = "analysis_labels"

    analysis_id: Mapped[int] = mapped_column(ForeignKey("analyses.id", ondelete="CASCADE"), primary_key=True)
    label: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)  # the model's label order
    probability: Mapped[float] = mapped_column(Float)
    call: Mapped[str] = mapped_column(String(16))  # chestxray.calls.CALLS

    analysis: Mapped[Analysis] = relationship(back_populates="labels")


class Feedback(Base):
    """A reader's review of one label of one analysis: agree/disagree with the call and/or the true label."""

    __tablename__ = "feedback"
    __table_args__ = (UniqueConstraint("analysis_id", "label", name="uq_feedback_analysis_label"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    analysis_id: Mapped[int] = mapped_column(ForeignKey("analyses.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(64))
    agree: Mapped[bool | None] = mapped_column(Boolean)  # None: no opinion on the call
    truth: Mapped[str | None] = mapped_column(String(16))  # TRUTHS, or None: not assessed
    reader: Mapped[str | None] = mapped_column(String(80))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    analysis: Mapped[Analysis] = relationship(back_populates="feedback")
