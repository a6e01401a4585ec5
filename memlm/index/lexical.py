"""Lexical lookup for LMLM: (subject, relation) -> entry, by exact key, then alias, then fuzzy embedding match.

LMLM's public code embeds "entity relation" and takes the top hit above 0.6 cosine; an audit found 0.7-13.6%
of deleted facts still answered through such near-neighbour lookups. Here:

1. exact: normalised subject + relation against the bank's indexed ``key`` column (SQL, always current);
2. alias: the same against the aliases table (other names of the subject);
3. the subject first, then the relation. The subject is the one the bank knows by exactly this name (or
   alias), else the single nearest subject by embedding cosine, above ``threshold``. Only that subject's
   entries are candidates: a lookup never moves to a neighbouring subject because the asked-for fact is missing
   (deleted) there. Among them the relation must match exactly after normalisation or, for a relation name
   the bank does not use at all (a paraphrase), by embedding cosine above ``threshold``. A relation the bank
   knows is never fuzzily swapped for another: "birth_city" deleted is not answered by "birth_date".
   (Embedding "subject relation" as one string would let the shared relation words outvote a misspelt
   subject: "Japn capital" -> Aruba.)

Every answer is re-read from the bank and checked against the namespaces asked for, and the fuzzy index and
the set of relation names are refreshed from the edit log before each lookup, so a deleted entry (or its
aliases) is never returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from memlm.bank.entry import Entry, lookup_key, normalise
from memlm.bank.store import MemoryBank
from memlm.encode.base import Encoder
from memlm.index.exact import ExactIndex


@dataclass(frozen=True)
class Lookup:
    entry: Entry
    how: str  # "exact" | "alias" | "fuzzy"
    score: float  # 1.0 for exact and alias


class LexicalIndex:
    """``lookup(subject, relation, namespaces=None) -> Lookup | None``. ``encoder=None`` disables fuzzy matching."""

    def __init__(
        self, bank: MemoryBank, encoder: Encoder | None = None, *, threshold: float = 0.8, fuzzy_k: int = 64
    ) -> None:
        self.bank, self.encoder, self.threshold, self.fuzzy_k = bank, encoder, threshold, fuzzy_k
        self._fuzzy: ExactIndex | None = None
        self._version = -1
        self._relations: tuple[int, dict[str | None, set[str]]] | None = None  # (bank version, ns -> names)

    def _sql_first(self, sql: str, key: str, namespaces: Sequence[str] | None) -> Entry | None:
        args: list = [key]
        if namespaces is not None:
            if not namespaces:
                return None
            sql += f" AND e.namespace IN ({','.join('?' * len(namespaces))})"
            args += list(namespaces)
        row = self.bank.connection.execute(sql + " ORDER BY e.id LIMIT 1", args).fetchone()
        return None if row is None else self.bank.get(row[0])

    def lookup(self, subject: str, relation: str, namespaces: Sequence[str] | None = None) -> Lookup | None:
        key = lookup_key(subject, relation)
        e = self._sql_first("SELECT e.id FROM entries e WHERE e.key=?", key, namespaces)
        if e is not None:
            return Lookup(e, "exact", 1.0)
        e = self._sql_first(
            "SELECT e.id FROM aliases a JOIN entries e ON e.id=a.entry_id WHERE a.alias_key=?",
            key,
            namespaces,
        )
        if e is not None:
            return Lookup(e, "alias", 1.0)
        if self.encoder is None:
            return None
        own = self.subject_entries(subject, namespaces)
        if own:  # the bank knows this very name: its own entries or nothing
            return self._relation_match(own, 1.0, relation, namespaces)
        return self._fuzzy_lookup(subject, relation, namespaces)

    def subject_entries(self, subject: str, namespaces: Sequence[str] | None = None) -> list[Entry]:
        """Entries whose subject, or one of whose aliases, is ``subject`` after normalisation."""
        if namespaces is not None and not namespaces:
            return []
        lo = normalise(subject) + "\x1f"  # keys are "subject \x1f relation"; \x20 is the next code point
        hi = lo[:-1] + "\x20"
        ids = [
            r[0]
            for r in self.bank.connection.execute(
                "SELECT id FROM entries WHERE key >= ? AND key < ? "
                "UNION SELECT entry_id FROM aliases WHERE alias_key >= ? AND alias_key < ?",
                (lo, hi, lo, hi),
            )
        ]
        return self._in(self.bank.get_many(sorted(ids), missing_ok=True), namespaces)

    @staticmethod
    def _in(entries: Sequence[Entry | None], namespaces: Sequence[str] | None) -> list[Entry]:
        allowed = None if namespaces is None else set(namespaces)
        return [e for e in entries if e is not None and (allowed is None or e.namespace in allowed)]

    def known_relation(self, relation: str, namespaces: Sequence[str] | None = None) -> bool:
        """Whether any entry (in ``namespaces``) uses this relation name, after normalisation."""
        version = self.bank.version
        if self._relations is None or self._relations[0] != version:
            names: dict[str | None, set[str]] = {}
            for rel, ns in self.bank.connection.execute(
                "SELECT DISTINCT relation, namespace FROM entries WHERE relation IS NOT NULL"
            ):
                names.setdefault(ns, set()).add(normalise(rel))
            self._relations = (version, names)
        names = self._relations[1]
        rel = normalise(relation)
        return any(rel in v for ns, v in names.items() if namespaces is None or ns in namespaces)

    def _relation_match(
        self, entries: Sequence[Entry], subject_score: float, relation: str, namespaces: Sequence[str] | None
    ) -> Lookup | None:
        """The entry of ``entries`` (one subject's) whose relation is ``relation``: exactly, or by embedding
        for a relation name the bank does not use."""
        rel = normalise(relation)
        exact = [e for e in entries if normalise(e.relation or "") == rel]
        if exact:
            return Lookup(exact[0], "fuzzy", subject_score)
        if self.known_relation(relation, namespaces):
            return None
        others = sorted({e.relation for e in entries if e.relation})
        if not others:
            return None
        sims = self.encoder.encode(others) @ self.encoder.encode([relation])[0]
        score = {r: float(v) for r, v in zip(others, sims)}
        best = max(entries, key=lambda e: (score.get(e.relation, -1.0), -e.id))
        if score.get(best.relation, -1.0) < self.threshold:
            return None
        return Lookup(best, "fuzzy", subject_score * score[best.relation])

    # ---------------------------------------------------------------- fuzzy
    def _key_rows(self, ids: Sequence[int] | None) -> tuple[list[int], list[str], list[str]]:
        """(id, key text, namespace) for every entry with a triple and every alias, optionally only these ids."""
        con = self.bank.connection
        out_ids, texts, nss = [], [], []
        chunks = [None] if ids is None else [list(ids)[c : c + 900] for c in range(0, len(ids), 900)]
        for part in chunks:
            where = "" if part is None else f" AND e.id IN ({','.join('?' * len(part))})"
            args = [] if part is None else part
            for eid, subj, _rel, ns in con.execute(
                f"SELECT e.id, e.subject, e.relation, e.namespace FROM entries e WHERE e.key IS NOT NULL{where} "
                f"UNION ALL SELECT e.id, a.alias, e.relation, e.namespace FROM aliases a JOIN entries e ON e.id=a.entry_id "
                f"WHERE 1{where}",
                args + args,
            ):
                out_ids.append(eid)
                texts.append(subj)
                nss.append(ns)
        return out_ids, texts, nss

    def _add(self, ids: list[int], texts: list[str], nss: list[str]) -> None:
        # A subject's name keys each of its entries (3 to 6 of them): encode every distinct name once. The first
        # fuzzy lookup pays this encode; on geo's 7,485 entries it was 28 s for 2,252 names.
        names = list(dict.fromkeys(texts))
        vec: dict[str, np.ndarray] = {}
        for c in range(0, len(names), 8192):
            vec.update(zip(names[c : c + 8192], self.encoder.encode(names[c : c + 8192]), strict=True))
        for c in range(0, len(ids), 8192):
            rows = np.stack([vec[t] for t in texts[c : c + 8192]])
            self._fuzzy.add(np.asarray(ids[c : c + 8192], np.int64), rows, nss[c : c + 8192])

    def refresh(self) -> None:
        """Bring the fuzzy key index up to date with the bank's edit log."""
        version = self.bank.version
        if self._fuzzy is None:
            self._fuzzy = ExactIndex(dim=self.encoder.dim)
            self._add(*self._key_rows(None))
        elif version != self._version:
            changed = self.bank.changed_since(self._version)
            self._fuzzy.remove(np.asarray(changed, np.int64))
            self._add(*self._key_rows(changed))
        self._version = version

    def _fuzzy_lookup(self, subject: str, relation: str, namespaces: Sequence[str] | None) -> Lookup | None:
        """The nearest subject above the threshold, then the relation among its own entries only."""
        self.refresh()
        q = self.encoder.encode([subject])
        scores, ids = self._fuzzy.search(q, self.fuzzy_k, namespaces)
        hits = [
            (sc, i) for sc, i in zip(scores[0].tolist(), ids[0].tolist()) if i >= 0 and sc >= self.threshold
        ]
        entries = {
            e.id: e for e in self._in(self.bank.get_many([i for _, i in hits], missing_ok=True), namespaces)
        }
        best: tuple[float, Entry] | None = None
        for sc, i in hits:  # best first
            if i in entries:
                best = (sc, entries[i])
                break
        if best is None:
            return None
        sc, e = best
        # The nearest key may be an alias of the entry: the subject is the entry's subject with its aliases.
        name = e.subject if e.subject is not None else ""
        return self._relation_match(self.subject_entries(name, namespaces), sc, relation, namespaces)
