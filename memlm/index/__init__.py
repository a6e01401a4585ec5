"""Vector and lexical indexes over a bank's entries, all with one protocol (see memlm.index.base):

``search(queries (B, d), k, namespaces=None) -> (scores (B, k), ids (B, k) int64, -1 = none)``,
``add(ids, vectors, namespaces)``, ``remove(ids)``, ``save(path)``, ``load_index(path)``.

Kinds: exact (torch, the reference), faiss (Flat / IVF / HNSW / PQ), pk (product keys), and the
lexical lookup for LMLM. :class:`Retriever` keeps an index in step with a bank's edits.
"""

from memlm.index.base import IndexFileError, ShardedIndex, VectorIndex
from memlm.index.exact import ExactIndex
from memlm.index.faiss_index import FaissIndex
from memlm.index.kinds import KINDS, load_index
from memlm.index.lexical import LexicalIndex, Lookup
from memlm.index.product_keys import ProductKeyIndex
from memlm.index.retriever import Hit, Retriever

__all__ = [
    "KINDS", "ExactIndex", "FaissIndex", "Hit", "IndexFileError", "LexicalIndex", "Lookup", "ProductKeyIndex",
    "Retriever", "ShardedIndex", "VectorIndex", "load_index",
]  # fmt: skip
