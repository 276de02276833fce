"""The results database: one row per analysis from every entry point, readers' feedback, and the queries the monitor
and the export read. SQLAlchemy 2.x; an SQLite file by default, PostgreSQL for several app servers; the schema is
made and upgraded by the Alembic migrations in migrations/ when the store opens.

No patient data is stored: an entry is built from the Prediction (probabilities, calls, scope, sizes) and from
technical header fields only (bit depth, photometric interpretation); never a name, ID, date, accession number or
file name. Images and heatmaps stay files in chestxray.results under its retention; `delete_result` removes a row
when its result is deleted, while retention only prunes the files, so the monitor keeps its history.
No Flask here: chestxray/web/monitoring.py (the web blueprint) and the CLI call AnalysisStore.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import create_engine, delete, event, func, select, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError
from sqlalchemy.orm import selectinload, sessionmaker

from ..fileio import cached_file_sha256
from .models import OUTCOMES, SOURCES, TRUTHS, Analysis, Base, Feedback, LabelAnswer

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["AnalysisStore", "Base", "ModelVersion", "StoreError", "Review", "answered_entry", "refused_entry",
           "image_facts", "model_version", "sqlite_url", "DEFAULT_FILE", "HEAD"]

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
HEAD = "0002"  # the newest migration; a test checks it is Alembic's head
DEFAULT_FILE = "results.sqlite3"
READER_MAX = 80
# Any constant works: two app servers starting at once take this PostgreSQL advisory lock, so one migrates first.
MIGRATION_LOCK = 0x43585244
log = logging.getLogger("chestxray.store")


class StoreError(RuntimeError):
    """The database cannot be opened or used; the message says which database (password hidden) and why."""


@dataclass(frozen=True)
class ModelVersion:
    """What identifies the model that answered: its checkpoint file's name (with arch and size) and SHA-256."""

    name: str | None
    hash: str | None
    backend: str | None = None


@dataclass(frozen=True)
class Review:
    """A reader's review of one label: agree with the call (True/False/None) and the true label (TRUTHS or None)."""

    agree: bool | None = None
    truth: str | None = None

    def __post_init__(self) -> None:
        if self.truth is not None and self.truth not in TRUTHS:
            raise ValueError(f"a true label is one of {TRUTHS} or None (not assessed), got {self.truth!r}")


def sqlite_url(folder: str | os.PathLike, name: str = DEFAULT_FILE) -> str:
    """sqlite:///<folder>/<name>, the folder created if missing."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(folder).resolve() / name}"


def database_url(url: str) -> URL:
    """Parse a database URL; postgresql:// without a driver uses psycopg 3 (the one requirements.txt installs).

    Raises StoreError for a malformed URL or a database other than SQLite or PostgreSQL."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError(f"cannot parse the database URL {url!r}: use sqlite:///PATH or "
                         "postgresql://USER:PASSWORD@HOST:PORT/DATABASE") from None
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise StoreError(f"the results database must be SQLite or PostgreSQL, got {parsed.get_backend_name()!r}")
    return parsed


def model_version(checkpoint: str | os.PathLike | None, predictor=None) -> ModelVersion:
    """The checkpoint's file name (plus the predictor's arch and input size) and its SHA-256 (computed once per file
    version); hash None when the file cannot be read."""
    name = Path(checkpoint).name if checkpoint else None
    digest = None
    if checkpoint:
        with contextlib.suppress(OSError):
            digest = cached_file_sha256(checkpoint)
    if predictor is not None:
        name = f"{name or 'model'} ({predictor.meta.arch} {predictor.meta.image_size}px)"
    backend = None
    if predictor is not None:
        backend = predictor.model_card()["backend"]
    return ModelVersion(name, digest, backend)


def image_facts(source: bytes | str | os.PathLike | Dataset | None, image_format: str | None) -> dict:
    """Technical facts of the input, never identifying ones: {"bit_depth", "photometric"} (None when unknown).

    DICOM: BitsStored and PhotometricInterpretation, from a header already read (a pydicom Dataset), else read with
    pydicom from the header only (specific_tags, so no other element is even parsed). PNG/JPEG: bits per sample and
    colour type from Pillow's mode.
    """
    facts = {"bit_depth": None, "photometric": None}
    if source is None or image_format is None:
        return facts
    try:
        if image_format == "DICOM":
            import pydicom

            ds = source if isinstance(source, pydicom.Dataset) else pydicom.dcmread(
                io.BytesIO(source) if isinstance(source, bytes) else source, stop_before_pixels=True, force=True,
                specific_tags=["BitsStored", "PhotometricInterpretation"])
            bits = ds.get("BitsStored")
            photometric = ds.get("PhotometricInterpretation")
            facts["bit_depth"] = int(bits) if bits is not None else None
            facts["photometric"] = str(photometric)[:16] if photometric is not None else None
        else:
            from PIL import Image

            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                mode = im.mode
            facts["bit_depth"] = 16 if mode.startswith("I;16") or mode in ("I", "F") else (1 if mode == "1" else 8)
            facts["photometric"] = {"L": "MONOCHROME2", "LA": "MONOCHROME2", "1": "MONOCHROME2", "I": "MONOCHROME2",
                                    "P": "PALETTE COLOR", "RGB": "RGB", "RGBA": "RGB", "CMYK": "CMYK",
                                    "YCbCr": "YBR_FULL"}.get(mode.split(";")[0], mode[:16])
    except Exception as exc:  # a fact we cannot read is left empty; the analysis itself already succeeded
        log.debug("image facts unreadable: %s", type(exc).__name__)
    return facts


def answered_entry(prediction, *, source: str, latency_s: float | None, model: ModelVersion,
                   result_id: str | None = None, data: bytes | str | os.PathLike | Dataset | None = None,
                   input_stats: tuple[float, float] | None = None, created: datetime | None = None) -> dict:
    """The row for an answered analysis, from a chestxray Prediction (its to_dict() calls and probabilities).

    data: the input's bytes or path, or its DICOM header already read, for image_facts only. input_stats:
    (brightness, contrast) of the model input (chestxray.monitor.input_statistics); by default the prediction's own,
    which the Predictor reads from the input its forward pass used."""
    document = prediction.to_dict()
    if input_stats is None:
        input_stats = getattr(prediction, "input_stats", None)
    width, height = document["original_size"]
    return {
        "result_id": result_id, "created": created or datetime.now(UTC), "source": source,
        "model_name": model.name, "model_hash": model.hash, "backend": model.backend or document["model"].get(
            "backend"), "outcome": "answered", "reason": None,
        "in_scope": document["in_scope"], "scope_score": document["scope_score"],
        "scope_limit": document["scope_limit"], "orientation": _orientation(prediction),
        "image_format": document["format"], "width": width, "height": height,
        **image_facts(data, document["format"]),
        "brightness": input_stats[0] if input_stats else None, "contrast": input_stats[1] if input_stats else None,
        "latency_ms": None if latency_s is None else 1000.0 * latency_s,
        "labels": [(row["label"], row["probability"], row["call"]) for row in document["labels"]],
    }


def _orientation(prediction) -> str | None:
    # The orientation check is optional in a Prediction: recorded when the predictor reports one.
    value = getattr(prediction, "orientation", None)
    if value is None or isinstance(value, (str, bool)):
        return None if value is None else str(value)[:40]
    return str(getattr(value, "verdict", value))[:40]


def refused_entry(*, source: str, reason: str, latency_s: float | None, model: ModelVersion,
                  outcome: str = "refused", created: datetime | None = None) -> dict:
    """The row for an input that got no answer: reason is a short category ("unsupported format", ...), never the
    input's own text."""
    return {"result_id": None, "created": created or datetime.now(UTC), "source": source, "model_name": model.name,
            "model_hash": model.hash, "backend": model.backend, "outcome": outcome, "reason": reason[:80],
            "latency_ms": None if latency_s is None else 1000.0 * latency_s, "labels": []}


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes: every time stored here is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


class AnalysisStore:
    """The results database. Thread-safe (a session per call); several processes may share one PostgreSQL."""

    def __init__(self, url: str, upgrade: bool = True) -> None:
        """Open the database at `url` and (by default) run the migrations up to HEAD.

        Raises StoreError when it cannot be opened, migrated, or is at a revision this version does not know."""
        self.url = database_url(url)
        self.shown_url = self.url.render_as_string(hide_password=True)
        self.dialect = self.url.get_backend_name()
        if self.dialect == "sqlite" and self.url.database not in (None, "", ":memory:"):
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
        # pool_pre_ping: a PostgreSQL restarted behind the app's back is reconnected, not answered with an error.
        self.engine: Engine = create_engine(self.url, pool_pre_ping=self.dialect == "postgresql")
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if upgrade:
            self.upgrade()

    def __repr__(self) -> str:
        return f"AnalysisStore({self.shown_url!r})"

    # -- schema ------------------------------------------------------------------------------------------------------

    def alembic_config(self):
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.set_main_option("sqlalchemy.url", self.url.render_as_string(hide_password=False).replace("%", "%%"))
        return config

    def upgrade(self, revision: str = "head") -> None:
        """Run the Alembic migrations up to `revision`; two processes doing it at once take turns."""
        from alembic import command

        config = self.alembic_config()
        try:
            with self._migration_lock(), self.engine.begin() as connection:
                if self.dialect == "postgresql":
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
                config.attributes["connection"] = connection
                command.upgrade(config, revision)
        except Exception as exc:
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot open or upgrade the results database {self.shown_url}: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc

    def revision(self) -> str | None:
        """The database's Alembic revision (None for an empty database)."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        if self.dialect != "sqlite" or self.url.database in (None, "", ":memory:"):
            yield
            return
        with open(f"{self.url.database}.lock", "a") as lock:  # a sibling file: the database may not exist yet
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def dispose(self) -> None:
        self.engine.dispose()

    # -- writing ----------------------------------------------------------------------------------------------------

    def record(self, entry: Mapping) -> int:
        """Store one analysis (answered_entry / refused_entry); returns its row id."""
        return self.record_many([entry])[0]

    def record_many(self, entries: Iterable[Mapping]) -> list[int]:
        """Store several analyses in one transaction; returns their row ids in order."""
        rows = [_analysis_row(entry) for entry in entries]
        with self._sessions.begin() as session:
            session.add_all(rows)
            session.flush()
            return [row.id for row in rows]

    def delete_result(self, result_id: str) -> bool:
        """Delete the analysis of a deleted result, with its labels and feedback; False when there was none."""
        with self._sessions.begin() as session:
            analysis = session.scalar(select(Analysis).where(Analysis.result_id == result_id))
            if analysis is None:
                return False
            session.delete(analysis)  # the ORM cascade (and ON DELETE CASCADE) take its labels and feedback
            return True

    def save_feedback(self, result_id: str, reviews: Mapping[str, Review], reader: str | None = None,
                      now: datetime | None = None) -> int:
        """Store a reader's reviews of a result's labels, replacing earlier ones for those labels; a Review with
        neither an opinion nor a true label removes the label's review. Returns the labels now reviewed.

        Raises LookupError for a result the database does not hold, ValueError for a label its model lacks."""
        reader = " ".join((reader or "").split())[:READER_MAX] or None
        now = now or datetime.now(UTC)
        for attempt in range(2):  # two servers saving the same new review at once: the second one retries as update
            try:
                with self._sessions.begin() as session:
                    analysis = session.scalar(select(Analysis).where(Analysis.result_id == result_id)
                                              .options(selectinload(Analysis.feedback), selectinload(Analysis.labels)))
                    if analysis is None:
                        raise LookupError(f"no analysis is stored for result {result_id}")
                    known = {row.label for row in analysis.labels}
                    unknown = set(reviews) - known
                    if unknown:
                        raise ValueError(f"this result has no label(s) {sorted(unknown)}")
                    existing = {row.label: row for row in analysis.feedback}
                    for label, review in reviews.items():
                        row = existing.get(label)
                        if review.agree is None and review.truth is None:
                            if row is not None:
                                analysis.feedback.remove(row)
                            continue
                        if row is None:
                            row = Feedback(label=label)
                            analysis.feedback.append(row)
                        row.agree, row.truth, row.reader, row.created = review.agree, review.truth, reader, now
                    session.flush()
                    return sum(1 for row in analysis.feedback)
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    # -- reading ----------------------------------------------------------------------------------------------------

    def feedback(self, result_id: str) -> dict[str, dict]:
        """{label: {"agree", "truth", "reader", "created"}} for a result's reviewed labels ({} when none)."""
        with self._sessions() as session:
            rows = session.scalars(select(Feedback).join(Analysis).where(Analysis.result_id == result_id)).all()
            return {row.label: {"agree": row.agree, "truth": row.truth, "reader": row.reader,
                                "created": _utc(row.created)} for row in rows}

    def has_result(self, result_id: str) -> bool:
        with self._sessions() as session:
            return session.scalar(select(Analysis.id).where(Analysis.result_id == result_id)) is not None

    def count(self) -> int:
        with self._sessions() as session:
            return int(session.scalar(select(func.count()).select_from(Analysis)))

    def answered_count(self, model_hash: str | None = None) -> int:
        """Answered analyses in the database (of that model): where the monitor's checks fall (every step-th)."""
        query = select(func.count()).select_from(Analysis).where(Analysis.outcome == "answered")
        if model_hash is not None:
            query = query.where(Analysis.model_hash == model_hash)
        with self._sessions() as session:
            return int(session.scalar(query))

    def analyses(self, since: datetime | None = None, until: datetime | None = None, limit: int | None = None,
                 reviewed_only: bool = False, newest: bool = False) -> list[dict]:
        """Analyses (oldest first; newest first with `newest`) with their labels and feedback, as plain documents.

        since/until: created >= since, < until (aware datetimes). reviewed_only: those with some feedback."""
        query = select(Analysis).options(selectinload(Analysis.labels), selectinload(Analysis.feedback))
        if since is not None:
            query = query.where(Analysis.created >= since)
        if until is not None:
            query = query.where(Analysis.created < until)
        if reviewed_only:
            query = query.where(Analysis.feedback.any())
        order = (Analysis.created.desc(), Analysis.id.desc()) if newest else (Analysis.created, Analysis.id)
        query = query.order_by(*order)
        if limit is not None:
            query = query.limit(limit)
        with self._sessions() as session:
            return [_document(row) for row in session.scalars(query).all()]

    def columns(self, since: datetime | None = None, last: int | None = None,
                model_hash: str | None = None) -> dict[str, np.ndarray]:
        """The analyses as columns for the monitor: created, source, outcome, reason, in_scope, scope_score,
        brightness, contrast, latency_ms (arrays, oldest first), "labels" (label names in model order) and
        "probability"/"call" (N, L) arrays (NaN / "" where a row has no such label).

        since: from that time; last: only the newest `last` answered analyses (the drift window); model_hash: only
        that model's analyses (a window compares one model with its own reference)."""
        query = select(Analysis.id, Analysis.created, Analysis.source, Analysis.outcome, Analysis.reason,
                       Analysis.in_scope, Analysis.scope_score, Analysis.brightness, Analysis.contrast,
                       Analysis.latency_ms)
        if since is not None:
            query = query.where(Analysis.created >= since)
        if model_hash is not None:
            query = query.where(Analysis.model_hash == model_hash)
        if last is not None:
            query = query.where(Analysis.outcome == "answered").order_by(Analysis.created.desc(),
                                                                         Analysis.id.desc()).limit(last)
        with self._sessions() as session:
            rows = session.execute(query).all()
            rows.sort(key=lambda r: (_utc(r.created), r.id))
            ids = [r.id for r in rows]
            answers = []
            for chunk in range(0, len(ids), 5000):  # an IN list of bounded size
                answers += session.execute(select(LabelAnswer.analysis_id, LabelAnswer.label, LabelAnswer.position,
                                                  LabelAnswer.probability, LabelAnswer.call)
                                           .where(LabelAnswer.analysis_id.in_(ids[chunk:chunk + 5000]))).all()
        labels = [label for _, label in sorted({(a.position, a.label) for a in answers})]
        labels = list(dict.fromkeys(labels))
        where = {rid: i for i, rid in enumerate(ids)}
        column = {label: j for j, label in enumerate(labels)}
        probability = np.full((len(ids), len(labels)), np.nan)
        call = np.full((len(ids), len(labels)), "", dtype=object)
        for a in answers:
            probability[where[a.analysis_id], column[a.label]] = a.probability
            call[where[a.analysis_id], column[a.label]] = a.call

        def floats(name: str) -> np.ndarray:
            return np.array([np.nan if getattr(r, name) is None else getattr(r, name) for r in rows], dtype=float)

        return {"created": np.array([_utc(r.created) for r in rows], dtype=object),
                "source": np.array([r.source for r in rows], dtype=object),
                "outcome": np.array([r.outcome for r in rows], dtype=object),
                "reason": np.array([r.reason or "" for r in rows], dtype=object),
                "in_scope": np.array([r.in_scope for r in rows], dtype=object),
                "scope_score": floats("scope_score"), "brightness": floats("brightness"),
                "contrast": floats("contrast"), "latency_ms": floats("latency_ms"),
                "labels": labels, "probability": probability, "call": call}

    def totals(self) -> dict[tuple[str, str], int]:
        """{(source, outcome): analyses} over the whole database."""
        query = select(Analysis.source, Analysis.outcome, func.count()).group_by(Analysis.source, Analysis.outcome)
        with self._sessions() as session:
            return {(source, outcome): int(n) for source, outcome, n in session.execute(query).all()}

    def reviews(self, since: datetime | None = None,
                model_hash: str | None = None) -> list[tuple[str, str, bool | None, str | None]]:
        """(label, call, agree, truth) for every reviewed label of analyses created since `since` (by that model)."""
        query = (select(Feedback.label, LabelAnswer.call, Feedback.agree, Feedback.truth)
                 .join(LabelAnswer, (LabelAnswer.analysis_id == Feedback.analysis_id)
                       & (LabelAnswer.label == Feedback.label))
                 .join(Analysis, Analysis.id == Feedback.analysis_id))
        if since is not None:
            query = query.where(Analysis.created >= since)
        if model_hash is not None:
            query = query.where(Analysis.model_hash == model_hash)
        with self._sessions() as session:
            return [tuple(row) for row in session.execute(query).all()]


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")  # SQLite leaves ON DELETE CASCADE off unless asked, per connection
    cursor.execute("PRAGMA busy_timeout=30000")  # wait for another writer rather than fail with "locked"
    # WAL: readers (the monitor) never block the writer; synchronous=NORMAL is safe against an app crash in WAL mode.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _analysis_row(entry: Mapping) -> Analysis:
    if entry["source"] not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {entry['source']!r}")
    if entry["outcome"] not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {entry['outcome']!r}")
    fields = {key: value for key, value in entry.items() if key != "labels"}
    for key in ("scope_score", "scope_limit", "brightness", "contrast", "latency_ms"):
        value = fields.get(key)
        if value is not None and not np.isfinite(value):
            fields[key] = None  # PostgreSQL would store NaN, SQLite NULL: one meaning, NULL
    row = Analysis(**fields)
    row.labels = [LabelAnswer(label=label, position=i, probability=float(p), call=call)
                  for i, (label, p, call) in enumerate(entry.get("labels", ()))]
    return row


def _document(row: Analysis) -> dict:
    feedback = {f.label: f for f in row.feedback}

    def review(label: str) -> dict | None:
        f = feedback.get(label)
        if f is None:
            return None
        return {"agree": f.agree, "truth": f.truth, "reader": f.reader,
                "created": _utc(f.created).isoformat(timespec="seconds")}

    return {
        "result_id": row.result_id, "created": _utc(row.created).isoformat(timespec="seconds"), "source": row.source,
        "model": {"name": row.model_name, "hash": row.model_hash, "backend": row.backend},
        "outcome": row.outcome, "reason": row.reason, "in_scope": row.in_scope, "scope_score": row.scope_score,
        "scope_limit": row.scope_limit, "orientation": row.orientation,
        "image": {"format": row.image_format, "width": row.width, "height": row.height, "bit_depth": row.bit_depth,
                  "photometric": row.photometric},
        "input": {"brightness": row.brightness, "contrast": row.contrast}, "latency_ms": row.latency_ms,
        "labels": [{"label": a.label, "probability": a.probability, "call": a.call, "feedback": review(a.label)}
                   for a in row.labels],
    }


def delete_all(store: AnalysisStore) -> None:
    """Empty every table (tests and benchmarks reuse one database)."""
    with store._sessions.begin() as session:
        for table in (Feedback, LabelAnswer, Analysis):
            session.execute(delete(table))
