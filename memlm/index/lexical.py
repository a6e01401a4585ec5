"""Lexical lookup for LMLM: (subject, relation) -> entry, by exact key, then alias, then fuzzy embedding match.

LMLM's public code embeds "entity relation" and takes the top hit above 0.6 cosine; an audit found 0.7-13.6%
of deleted facts still answered through such near-neighbour lookups. Here:

1. exact: normalised subject + relation against the bank's indexed ``key`` column (SQL, always current);
2. alias: the same against the aliases table (other names of the subject);
3. fuzzy: cosine between the query subject's embedding and every entry's subject (and alias), above
   ``threshold``; among those, the relation must match too: exactly after normalisation, or by embedding
   cosine above ``threshold``. The best product of the two similarities wins. (Embedding "subject relation"
   as one string lets the shared relation words outvote a misspelt subject: "Japn capital" -> Aruba.)

Every answer is re-read from the bank and checked against the namespaces asked for, and the fuzzy index is
refreshed from the edit log before each lookup, so a deleted entry (or its aliases) is never returned.
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
        return self._fuzzy_lookup(subject, relation, namespaces)

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
        for c in range(0, len(ids), 8192):
            vecs = self.encoder.encode(texts[c : c + 8192])
            self._fuzzy.add(np.asarray(ids[c : c + 8192], np.int64), vecs, nss[c : c + 8192])

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
        self.refresh()
        q = self.encoder.encode([subject])
        scores, ids = self._fuzzy.search(q, self.fuzzy_k, namespaces)
        subj_score: dict[int, float] = {}
        for sc, i in zip(scores[0].tolist(), ids[0].tolist()):
            if i >= 0 and sc >= self.threshold:
                subj_score[i] = max(subj_score.get(i, sc), sc)  # an entry may match by subject and by alias
        entries = [e for e in self.bank.get_many(list(subj_score), missing_ok=True) if e is not None]
        allowed = None if namespaces is None else set(namespaces)
        entries = [e for e in entries if allowed is None or e.namespace in allowed]
        if not entries:
            return None
        rel = normalise(relation)
        others = sorted({e.relation for e in entries if normalise(e.relation or "") != rel and e.relation})
        rel_score = {
            r: float(v)
            for r, v in zip(others, self.encoder.encode(others) @ self.encoder.encode([relation])[0])
        }
        best: tuple[float, Entry] | None = None
        for e in entries:
            r = 1.0 if normalise(e.relation or "") == rel else rel_score.get(e.relation, 0.0)
            if r >= self.threshold and (best is None or subj_score[e.id] * r > best[0]):
                best = (subj_score[e.id] * r, e)
        return None if best is None else Lookup(best[1], "fuzzy", best[0])
