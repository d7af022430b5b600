"""Prefix caching: full KV blocks addressed by content, reused by later requests that would compute
exactly the same K/V.

A full block's key is a hash of (its parent block's key, its tokens). The chain starts from a root
that hashes the adapter version's identity (a digest of the weights in its device slot, never its
name) and the cache namespace (the tenant under `--prefix-cache-scope key`, and the request's
`cache_salt`), so a block is shared only by requests with the same tokens before it, the same
weights and the same namespace. Blocks no sequence holds stay cached, least recently used first,
until the pool needs room (KVCache takes them back through `evict`), so caching never lowers
capacity. An adapter version that is replaced or unloaded has its blocks forgotten.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import Counter, OrderedDict
from collections.abc import Callable

from server.engine.sequence import Sequence

BASE_IDENTITY = "base"  # the root identity of requests on the bare base
Owner = (
    tuple[str, int] | None
)  # the adapter version (name, registry version) a block was computed by


def chain_root(identity: str, namespace: str) -> bytes:
    """The key every chain of a (weights identity, namespace) pair starts from."""
    fields = json.dumps(["loraplex-prefix-v1", identity, namespace])  # unambiguous field encoding
    return hashlib.sha256(fields.encode()).digest()


def block_key(parent: bytes, tokens: list[int]) -> bytes:
    """The key of a full block of tokens after the block whose key is parent."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class PrefixCache:
    """Maps block keys to pool blocks, keeps the cached blocks no sequence holds in LRU order, and
    counts queried and hit prompt tokens per adapter."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.blocks: dict[bytes, int] = {}  # key -> block
        self.keys: dict[int, bytes] = {}  # block -> key
        self.owners: dict[int, Owner] = {}  # block -> adapter version that computed it
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached, held by nobody; LRU first
        self.queried: Counter[str | None] = Counter()  # tokens looked up, by adapter (None: base)
        self.hits: Counter[str | None] = Counter()  # tokens found cached, by adapter

    def chain(self, seq: Sequence) -> list[bytes]:
        """The keys of seq's full blocks (extended as tokens arrive; seq.cache_root must be set)."""
        keys, size, tokens = seq.block_keys, self.block_size, seq.tokens
        for i in range(len(keys), len(tokens) // size):
            parent = keys[-1] if keys else seq.cache_root
            keys.append(block_key(parent, tokens[i * size : (i + 1) * size]))
        return keys

    def match(self, seq: Sequence) -> list[int]:
        """The blocks of the longest cached chain of seq's tokens, leaving at least its last token
        to compute (the step that computes it samples the next one)."""
        limit = (seq.length - 1) // self.block_size
        found = []
        for key in self.chain(seq)[:limit]:
            block = self.blocks.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def record(self, seq: Sequence, hit_tokens: int) -> None:
        """Count one admission's lookup."""
        self.queried[seq.adapter] += seq.length
        self.hits[seq.adapter] += hit_tokens

    def insert(self, seq: Sequence, owner: Owner) -> None:
        """Cache seq's blocks that became full and computed since the last call (a key already
        cached keeps its block: seq's copy stays private and is freed with it)."""
        full = min(seq.num_computed // self.block_size, len(seq.blocks))
        if full <= seq.cached_blocks:
            return
        keys = self.chain(seq)
        for i in range(seq.cached_blocks, full):
            block = seq.blocks[i]
            if keys[i] not in self.blocks and block not in self.keys:
                self.blocks[keys[i]] = block
                self.keys[block] = keys[i]
                self.owners[block] = owner
        seq.cached_blocks = full

    def holds(self, block: int) -> bool:
        """Whether block is cached (reusable by a later request once nobody holds it)."""
        return block in self.keys

    def park(self, block: int) -> None:
        """Keep a cached block nobody holds any more, as the most recently used."""
        self.idle[block] = None

    def unpark(self, block: int) -> None:
        """A parked block is held again."""
        self.idle.pop(block, None)

    def evict(self) -> int | None:
        """Forget the least recently used parked block and hand it back; None if none is parked."""
        if not self.idle:
            return None
        block, _ = self.idle.popitem(last=False)
        self._forget(block)
        return block

    def invalidate(self, is_current: Callable[[tuple[str, int]], bool]) -> list[int]:
        """Forget the blocks of adapter versions no longer current; returns the parked ones among
        them (now free); held ones are freed by their holders."""
        stale = [
            b for b, owner in self.owners.items() if owner is not None and not is_current(owner)
        ]
        freed = []
        for block in stale:
            self._forget(block)
            if block in self.idle:
                del self.idle[block]
                freed.append(block)
        return freed

    def _forget(self, block: int) -> None:
        del self.blocks[self.keys.pop(block)]
        del self.owners[block]
