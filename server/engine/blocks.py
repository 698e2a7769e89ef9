"""KV-cache blocks: which block ids each sequence holds, and which full blocks are cached for reuse.

Owns: the free list of a fixed pool of `num_blocks` blocks of `block_size` tokens, a reference
count per block, and the prefix cache: a full block is content-addressed by
    digest(previous block's digest, the adapter's identity, the block's token ids)
so a new sequence with the same adapter and the same leading tokens reuses those blocks instead of
recomputing them; the identity in the chain means two adapters never share a block, whatever the
prompt. Cached blocks nobody holds stay cached until the pool needs them (least recently freed
first); dropping an identity (its adapter was unloaded or replaced) frees its blocks at once.

It knows block ids, token ids and identities; never tensors, requests or the model. The runner
turns block tables into cache slots (slot = block * block_size + offset).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field


def block_digest(parent: bytes, identity: str, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(identity.encode())
    h.update(b"\x00")
    h.update(",".join(map(str, tokens)).encode())
    return h.digest()


@dataclass(eq=False)
class KVSeq:
    """What the block manager and the scheduler know about one sequence."""

    seq_id: str
    tokens: list[int]               # prompt + generated so far (the engine appends to this list)
    identity: str = ""              # the adapter's identity ("" for the base model)
    num_computed: int = 0           # leading tokens whose keys and values are in the cache
    block_table: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)  # one per full, computed block, in order
    cached_tokens: int = 0          # prompt tokens found in the prefix cache at its last admission
    lookup: bool = True             # False: compute every token (prompt logprobs need each one's logits)

    def __len__(self) -> int:
        return len(self.tokens)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._digest_of: dict[int, bytes] = {}        # cached block -> its digest
        self._block_of: dict[bytes, int] = {}         # digest -> cached block
        self._identity_of: dict[int, str] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks with no holder, oldest first
        self.queries = self.hits = 0                  # prompt tokens looked up / found (metrics)

    # -- accounting ------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        """Blocks that can be handed out now (free or cached but idle)."""
        return len(self._free) + len(self._idle)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        return len(self._digest_of)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # -- prefix cache ------------------------------------------------------------------------
    def _chain(self, seq: KVSeq, upto_blocks: int) -> list[bytes]:
        out: list[bytes] = []
        parent = b""
        bs = self.block_size
        for i in range(upto_blocks):
            parent = block_digest(parent, seq.identity, seq.tokens[i * bs:(i + 1) * bs])
            out.append(parent)
        return out

    def match(self, seq: KVSeq) -> list[int]:
        """Cached blocks holding the longest cached prefix of `seq` (at most len-1 tokens: the last
        token is always computed, so that there are logits to sample from)."""
        if not self.prefix_caching or not seq.lookup:
            return []
        full = (len(seq) - 1) // self.block_size
        found: list[int] = []
        for d in self._chain(seq, full):
            b = self._block_of.get(d)
            if b is None:
                break
            found.append(b)
        return found

    # -- allocation ------------------------------------------------------------------------
    def _take_free(self) -> int:
        if self._free:
            b = self._free.pop()
        else:  # evict the cached block idle for longest
            b, _ = self._idle.popitem(last=False)
            self._uncache(b)
        self._refs[b] = 1
        return b

    def _uncache(self, b: int) -> None:
        d = self._digest_of.pop(b, None)
        if d is not None:
            self._block_of.pop(d, None)
            self._identity_of.pop(b, None)

    def can_allocate(self, seq: KVSeq, num_new_tokens: int, hits: list[int] | None = None) -> bool:
        """Room for a waiting sequence to compute `num_new_tokens` past its cached prefix `hits`?"""
        hits = hits or []
        need = self.blocks_for(len(hits) * self.block_size + num_new_tokens) - len(hits)
        idle_hits = sum(1 for b in hits if self._refs[b] == 0)  # taking these removes them from the pool
        return need <= self.free_blocks - idle_hits

    def allocate(self, seq: KVSeq, hits: list[int]) -> None:
        """Admit a sequence: hold its cached prefix blocks; it then computes from the first block after."""
        assert not seq.block_table, "allocate on a sequence that holds blocks"
        for b in hits:
            if self._refs[b] == 0:
                self._idle.pop(b, None)
            self._refs[b] += 1
        seq.block_table = list(hits)
        seq.digests = [self._digest_of[b] for b in hits]
        seq.num_computed = len(hits) * self.block_size
        seq.cached_tokens = seq.num_computed
        self.queries += len(seq)
        self.hits += seq.num_computed

    def can_grow(self, seq: KVSeq, num_new_tokens: int) -> bool:
        return self.blocks_for(seq.num_computed + num_new_tokens) - len(seq.block_table) <= self.free_blocks

    def grow(self, seq: KVSeq, num_new_tokens: int) -> None:
        """Hold enough blocks for `num_new_tokens` more computed tokens. Check can_grow first."""
        need = self.blocks_for(seq.num_computed + num_new_tokens) - len(seq.block_table)
        if need > self.free_blocks:
            raise RuntimeError("out of KV blocks")  # the scheduler checks first; this is a bug guard
        for _ in range(need):
            seq.block_table.append(self._take_free())

    def computed(self, seq: KVSeq, num_tokens: int) -> None:
        """`num_tokens` more tokens of `seq` are in the cache: register the blocks that are now full."""
        seq.num_computed += num_tokens
        if not self.prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed // bs
        parent = seq.digests[-1] if seq.digests else b""
        for i in range(len(seq.digests), full):
            parent = block_digest(parent, seq.identity, seq.tokens[i * bs:(i + 1) * bs])
            seq.digests.append(parent)
            b = seq.block_table[i]
            if parent not in self._block_of and b not in self._digest_of:
                self._block_of[parent] = b
                self._digest_of[b] = parent
                self._identity_of[b] = seq.identity

    def free(self, seq: KVSeq) -> None:
        """Give back a sequence's blocks (finished or preempted); cached ones stay cached, idle."""
        for b in reversed(seq.block_table):  # the tail first: it is the least likely to be reused
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._digest_of:
                    self._idle[b] = None
                else:
                    self._free.append(b)
        seq.block_table, seq.digests, seq.num_computed = [], [], 0

    def drop_identity(self, identity: str) -> int:
        """Forget every cached block of one adapter identity, and of every per-request mix that
        has it as a source (identities "mix:..." name their sources); returns how many."""
        blocks = [b for b, i in self._identity_of.items()
                  if i == identity or (identity and i.startswith("mix:") and identity in i)]
        for b in blocks:
            self._uncache(b)
            if self._refs[b] == 0:
                self._idle.pop(b, None)
                self._free.append(b)
        return len(blocks)
