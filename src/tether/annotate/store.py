"""The annotation database (issue 16's first layer): annotators, pairs, assignments and answers.

SQLAlchemy Core on SQLite by default (WAL mode and a busy timeout, so many annotators write at once) or any
SQLAlchemy URL (PostgreSQL, tested: postgresql+psycopg://...). Every write is one transaction: a crash loses at most the answer being
written. Annotator tokens are random (`secrets`), shown once, and stored only as SHA-256 hashes.

Tables
  annotators   id, name (unique), token_hash (unique), created
  pairs        id, key (unique: hash of prompt and both responses), prompt (JSON messages), response_a,
               response_b, gold ('a', 'b' or NULL: a gold item's known answer), priority (active selection:
               higher is served first), meta (JSON: every other column of the source row), created
  assignments  id, pair_id, annotator_id (unique together: a pair never goes twice to one person), left
               ('a' or 'b': which response the annotator saw on the left), created, answered
  answers      id, assignment_id (unique), choice ('a', 'b', 'tie', 'both_bad'), strength 1-4, reason, created
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from pathlib import Path

from tether.errors import TetherError

CHOICES = ("a", "b", "tie", "both_bad")


def _sa():
    try:
        import sqlalchemy as sa
    except ImportError:
        raise TetherError("tether annotate needs SQLAlchemy: pip install sqlalchemy") from None
    return sa


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def pair_key(prompt: list[dict], a: str, b: str) -> str:
    return hashlib.sha256(json.dumps([prompt, a, b], sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Store:
    """The annotation database at `url` (a SQLAlchemy URL, or a file path for SQLite)."""

    def __init__(self, url: str):
        sa = _sa()
        self.sa = sa
        if "://" not in url:
            Path(url).expanduser().parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{Path(url).expanduser()}"
        self.url = url
        self.engine = sa.create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            @sa.event.listens_for(self.engine, "connect")
            def _pragmas(conn, _record):  # WAL: readers never block the writer; wait for a lock instead of failing
                conn.isolation_level = None  # SQLAlchemy's BEGIN below, not the driver's deferred one
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=10000")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

            @sa.event.listens_for(self.engine, "begin")
            def _begin(conn):  # take the write lock at the start: choosing a pair and assigning it is one step
                conn.exec_driver_sql("BEGIN IMMEDIATE")
        md = sa.MetaData()
        self.annotators = sa.Table("annotators", md,
                                   sa.Column("id", sa.Integer, primary_key=True),
                                   sa.Column("name", sa.String(200), nullable=False, unique=True),
                                   sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
                                   sa.Column("created", sa.Float, nullable=False))
        self.pairs = sa.Table("pairs", md,
                              sa.Column("id", sa.Integer, primary_key=True),
                              sa.Column("key", sa.String(64), nullable=False, unique=True),
                              sa.Column("prompt", sa.Text, nullable=False),
                              sa.Column("response_a", sa.Text, nullable=False),
                              sa.Column("response_b", sa.Text, nullable=False),
                              sa.Column("gold", sa.String(1)),
                              sa.Column("priority", sa.Float, nullable=False, default=0.0),
                              sa.Column("meta", sa.Text, nullable=False, default="{}"),
                              sa.Column("created", sa.Float, nullable=False))
        self.assignments = sa.Table("assignments", md,
                                    sa.Column("id", sa.Integer, primary_key=True),
                                    sa.Column("pair_id", sa.Integer, sa.ForeignKey("pairs.id"), nullable=False),
                                    sa.Column("annotator_id", sa.Integer, sa.ForeignKey("annotators.id"), nullable=False),
                                    sa.Column("left", sa.String(1), nullable=False),
                                    sa.Column("created", sa.Float, nullable=False),
                                    sa.Column("answered", sa.Boolean, nullable=False, default=False),
                                    sa.UniqueConstraint("pair_id", "annotator_id"))
        self.answers = sa.Table("answers", md,
                                sa.Column("id", sa.Integer, primary_key=True),
                                sa.Column("assignment_id", sa.Integer, sa.ForeignKey("assignments.id"), nullable=False, unique=True),
                                sa.Column("choice", sa.String(8), nullable=False),
                                sa.Column("strength", sa.Integer, nullable=False),
                                sa.Column("reason", sa.Text, nullable=False, default=""),
                                sa.Column("created", sa.Float, nullable=False))
        self.skips = sa.Table("skips", md,  # pairs an annotator skipped: not served to them again, not counted in overlap
                              sa.Column("pair_id", sa.Integer, sa.ForeignKey("pairs.id"), primary_key=True),
                              sa.Column("annotator_id", sa.Integer, sa.ForeignKey("annotators.id"), primary_key=True))
        md.create_all(self.engine)

    # ---- annotators --------------------------------------------------------------------------
    def add_annotator(self, name: str) -> str:
        """Create an annotator; returns their token (shown once: only its hash is stored)."""
        name = name.strip()
        if not name:
            raise TetherError("an annotator needs a name")
        token = secrets.token_urlsafe(24)
        with self.engine.begin() as c:
            if c.execute(self.sa.select(self.annotators.c.id).where(self.annotators.c.name == name)).first():
                raise TetherError(f"annotator '{name}' exists already")
            c.execute(self.annotators.insert().values(name=name, token_hash=hash_token(token), created=time.time()))
        return token

    def annotator_for(self, token: str) -> dict | None:
        """The annotator a token belongs to, or None (compared by the hash: the token itself is never stored)."""
        if not token:
            return None
        with self.engine.connect() as c:
            row = c.execute(self.sa.select(self.annotators).where(self.annotators.c.token_hash == hash_token(token))).first()
        return dict(row._mapping) if row else None

    def annotator_names(self) -> dict[int, str]:
        with self.engine.connect() as c:
            return {r.id: r.name for r in c.execute(self.sa.select(self.annotators.c.id, self.annotators.c.name))}

    # ---- pairs -------------------------------------------------------------------------------
    def add_pairs(self, items: list[dict]) -> int:
        """Insert pairs ({'prompt': messages, 'a': str, 'b': str, 'gold': 'a'|'b'|None, 'priority', 'meta'});
        a pair already in the database (same prompt and responses) is skipped. Returns how many were new."""
        new = 0
        with self.engine.begin() as c:
            have = {r.key for r in c.execute(self.sa.select(self.pairs.c.key))}
            for it in items:
                key = pair_key(it["prompt"], it["a"], it["b"])
                if key in have:
                    continue
                have.add(key)
                c.execute(self.pairs.insert().values(
                    key=key, prompt=json.dumps(it["prompt"], ensure_ascii=False), response_a=it["a"], response_b=it["b"],
                    gold=it.get("gold"), priority=float(it.get("priority", 0.0)),
                    meta=json.dumps(it.get("meta", {}), ensure_ascii=False), created=time.time()))
                new += 1
        return new

    def set_priorities(self, priorities: dict[int, float]) -> None:
        with self.engine.begin() as c:
            for pid, p in priorities.items():
                c.execute(self.pairs.update().where(self.pairs.c.id == pid).values(priority=float(p)))

    def all_pairs(self) -> list[dict]:
        with self.engine.connect() as c:
            rows = c.execute(self.sa.select(self.pairs).order_by(self.pairs.c.id)).all()
        return [{**dict(r._mapping), "prompt": json.loads(r.prompt), "meta": json.loads(r.meta)} for r in rows]

    # ---- assignment ----------------------------------------------------------------------------
    def next_assignment(self, annotator_id: int, overlap: int = 2, gold_rate: float = 0.0) -> dict | None:
        """The annotator's open assignment, or a new one; None when nothing is left for them.

        A pair goes to `overlap` different annotators and never twice to one person. Pairs already started
        come first (a pair's overlap is finished before new pairs open), then the highest `priority`
        (active selection), then the oldest. Gold items (pairs with a known answer) are served at
        `gold_rate` (a seeded draw per annotator and assignment), each at most once per annotator; they
        do not count towards a pair's overlap. Left/right order is random per assignment and recorded."""
        sa, P, A = self.sa, self.pairs, self.assignments
        with self.engine.begin() as c:
            self._serialise(c)
            open_ = c.execute(sa.select(A).where(A.c.annotator_id == annotator_id, A.c.answered.is_(False))).first()
            if open_ is not None:
                return self._view(c, open_)
            n_done = c.execute(sa.select(sa.func.count()).select_from(A).where(A.c.annotator_id == annotator_id)).scalar_one()
            mine = sa.union(sa.select(A.c.pair_id).where(A.c.annotator_id == annotator_id),
                            sa.select(self.skips.c.pair_id).where(self.skips.c.annotator_id == annotator_id))
            rng = secrets.SystemRandom()
            pick = None
            if gold_rate > 0 and rng.random() < gold_rate:
                pick = c.execute(sa.select(P.c.id).where(P.c.gold.is_not(None), P.c.id.not_in(mine))
                                 .order_by(P.c.id).limit(1)).first()
            if pick is None:
                count = sa.select(sa.func.count()).select_from(A).where(A.c.pair_id == P.c.id).scalar_subquery()
                pick = c.execute(sa.select(P.c.id).where(P.c.gold.is_(None), P.c.id.not_in(mine), count < overlap)
                                 .order_by((count > 0).desc(), P.c.priority.desc(), P.c.id).limit(1)).first()
            if pick is None:
                return None
            left = "a" if rng.random() < 0.5 else "b"
            res = c.execute(A.insert().values(pair_id=pick.id, annotator_id=annotator_id, left=left, created=time.time(),
                                              answered=False))
            row = c.execute(sa.select(A).where(A.c.id == res.inserted_primary_key[0])).first()
            view = self._view(c, row)
            view["progress"] = n_done  # assignments this annotator had before this one
            return view

    def _serialise(self, c) -> None:
        """Choosing a pair and assigning it must not interleave between annotators (two could take the last slot of
        a pair's overlap): SQLite's BEGIN IMMEDIATE already holds the write lock; PostgreSQL takes a transaction-level
        advisory lock; other databases get SERIALIZABLE-like safety only from the unique constraint."""
        if self.engine.dialect.name == "postgresql":
            c.exec_driver_sql("SELECT pg_advisory_xact_lock(7262)")

    def _view(self, c, assignment) -> dict:
        """What the annotator sees: the prompt, the left and right responses, the assignment id."""
        p = c.execute(self.sa.select(self.pairs).where(self.pairs.c.id == assignment.pair_id)).first()
        a, b = p.response_a, p.response_b
        left, right = (a, b) if assignment.left == "a" else (b, a)
        return {"assignment": assignment.id, "pair": p.id, "prompt": json.loads(p.prompt), "left": left, "right": right}

    def answer(self, annotator_id: int, assignment_id: int, choice: str, strength: int = 2, reason: str = "") -> dict:
        """Record an answer given as the annotator saw it: choice 'left', 'right', 'tie' or 'both_bad'."""
        A = self.assignments
        if choice not in ("left", "right", "tie", "both_bad"):
            raise ValueError(f"choice must be left, right, tie or both_bad, not {choice!r}")
        if not (isinstance(strength, int) and 1 <= strength <= 4):
            raise ValueError(f"strength must be 1, 2, 3 or 4, not {strength!r}")
        with self.engine.begin() as c:
            row = self._open_assignment(c, annotator_id, assignment_id)
            other = "b" if row.left == "a" else "a"
            stored = {"left": row.left, "right": other}.get(choice, choice)
            c.execute(self.answers.insert().values(assignment_id=assignment_id, choice=stored, strength=strength,
                                                   reason=str(reason)[:2000], created=time.time()))
            c.execute(A.update().where(A.c.id == assignment_id).values(answered=True))
        return {"assignment": assignment_id, "choice": stored}

    def _open_assignment(self, c, annotator_id: int, assignment_id: int):
        """The annotator's own unanswered assignment (PermissionError: someone else's or none; ValueError: answered)."""
        row = c.execute(self.sa.select(self.assignments).where(self.assignments.c.id == assignment_id)).first()
        if row is None or row.annotator_id != annotator_id:
            raise PermissionError("not your assignment")
        if row.answered:
            raise ValueError("this assignment is answered already (undo it first)")
        return row

    def skip(self, annotator_id: int, assignment_id: int) -> None:
        """Give an open assignment back: its pair is not served to this annotator again and does not count
        towards the pair's overlap."""
        A = self.assignments
        with self.engine.begin() as c:
            row = self._open_assignment(c, annotator_id, assignment_id)
            c.execute(A.delete().where(A.c.id == assignment_id))
            c.execute(self.skips.insert().values(pair_id=row.pair_id, annotator_id=annotator_id))

    def progress(self) -> dict:
        """Pairs and answers overall, and per annotator: answers, skips, first and last answer time."""
        sa, A, N = self.sa, self.assignments, self.answers
        names = self.annotator_names()
        with self.engine.connect() as c:
            n_pairs = c.execute(sa.select(sa.func.count()).select_from(self.pairs).where(self.pairs.c.gold.is_(None))).scalar_one()
            rows = c.execute(sa.select(A.c.annotator_id, sa.func.count(N.c.id), sa.func.min(N.c.created), sa.func.max(N.c.created))
                             .join(N, N.c.assignment_id == A.c.id).group_by(A.c.annotator_id)).all()
            skipped = dict(c.execute(sa.select(self.skips.c.annotator_id, sa.func.count()).group_by(self.skips.c.annotator_id)).all())
        per = {names[i]: {"answers": n, "skipped": skipped.get(i, 0),
                          "per_hour": (n - 1) / (t1 - t0) * 3600 if n > 1 and t1 > t0 else None} for i, n, t0, t1 in rows}
        for i, name in names.items():
            per.setdefault(name, {"answers": 0, "skipped": skipped.get(i, 0), "per_hour": None})
        return {"pairs": n_pairs, "answers": sum(p["answers"] for p in per.values()), "annotators": per}

    def undo(self, annotator_id: int) -> int | None:
        """Take back the annotator's latest answer; its pair is theirs to answer again. Returns the assignment id."""
        sa, A, N = self.sa, self.assignments, self.answers
        with self.engine.begin() as c:
            last = c.execute(sa.select(N.c.id, N.c.assignment_id).join(A, A.c.id == N.c.assignment_id)
                             .where(A.c.annotator_id == annotator_id).order_by(N.c.id.desc()).limit(1)).first()
            if last is None:
                return None
            # an open assignment fetched since then goes back to the pool, so the undone one is served next
            c.execute(A.delete().where(A.c.annotator_id == annotator_id, A.c.answered.is_(False)))
            c.execute(N.delete().where(N.c.id == last.id))
            c.execute(A.update().where(A.c.id == last.assignment_id).values(answered=False))
            return last.assignment_id

    def votes(self) -> dict[int, dict[str, str]]:
        """pair id -> {annotator name: choice ('a', 'b', 'tie', 'both_bad')} over every answer."""
        sa, A, N = self.sa, self.assignments, self.answers
        names = self.annotator_names()
        out: dict[int, dict[str, str]] = {}
        with self.engine.connect() as c:
            for r in c.execute(sa.select(A.c.pair_id, A.c.annotator_id, N.c.choice).join(N, N.c.assignment_id == A.c.id)):
                out.setdefault(r.pair_id, {})[names[r.annotator_id]] = r.choice
        return out

    def sides_shown(self) -> list[tuple[str, str, str]]:
        """(annotator, side shown on the left, choice) for every answer: for position bias."""
        sa, A, N = self.sa, self.assignments, self.answers
        names = self.annotator_names()
        with self.engine.connect() as c:
            return [(names[r.annotator_id], r.left, r.choice)
                    for r in c.execute(sa.select(A.c.annotator_id, A.c.left, N.c.choice).join(N, N.c.assignment_id == A.c.id))]


def pairs_from_file(path: str, gold: bool = False) -> list[dict]:
    """Pairs to annotate from a file: `prompt` + `response_a`/`response_b`, or preference rows (chosen/rejected, e.g.
    `tether label` or `cai revise` output; which one is shown left is drawn per assignment). Bad rows get the usual
    row-level errors. `gold`: the file's chosen responses are known to be better (gold items, preference rows only)."""
    from tether.data import normalise_comparisons, read_rows
    from tether.labeller import text_of

    rows = read_rows(path)
    if gold and "chosen" not in rows.rows[0]:
        raise TetherError(f"{path}: gold items need chosen/rejected rows (the chosen response is the known answer)")
    return [{"prompt": x["prompt"], "a": text_of(x["a"]), "b": text_of(x["b"]), "gold": "a" if gold else None,
             "meta": {k: v for k, v in x["meta"].items() if isinstance(v, (str, int, float, bool)) or v is None}}
            for x in normalise_comparisons(rows)]
