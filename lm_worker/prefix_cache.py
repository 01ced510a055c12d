"""Prompt-prefix reuse: the keys and values of a prompt's leading blocks, kept after its
prefill and copied into the slot of a later request whose prompt starts the same way.

A caption request for an image the worker has already seen, with the same text before
it, then prefills only what differs: here, the prompt's last position.

**Keys.** A prompt is cut into blocks of ``block_size`` positions. Block ``i``'s key is a
digest of block ``i - 1``'s key, block ``i``'s token ids and the content of every image
whose start token lies in block ``i``. Causal attention from absolute position 0 makes a
position's keys and values a function of the embeddings at and before it, and an image
changes the embeddings right after its start token, so a chained key names everything
that determines its block. Only full blocks before the prompt's last position are kept:
that position's logits are computed in every case. A request's ``cache_salt`` seeds the
chain: a hit is faster than a miss, so without salts a client could time whether another
sent the same image and text before; with them, tenants share nothing.

**Storage.** A pool of blocks ``[blocks, kv_heads, block_size, head_dim]`` per layer, in
the KV cache's dtype and on its device, with least-recently-used eviction. The slot
cache keeps each sequence contiguous, so blocks are copied in and out rather than
shared: a hit costs one copy of the prefix per layer, far less than recomputing it.
Everything here runs on the engine thread, between model steps.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch

from lm_worker.model.kv_cache import KVCache
from proto import ImageForInsert
from proto.image_for_insert import feature_blocks

__all__ = ["PrefixCache", "image_digests", "prefix_block_keys"]

_DIGEST_BYTES = 16


def image_digests(item: ImageForInsert) -> list[bytes]:
    """A digest of each image's features (dtype, shape and values), in order."""
    digests = []
    for block in feature_blocks(item.image_features if item.image_features is not None else []):
        block = block.detach().contiguous()  # [L, C]
        digest = hashlib.blake2b(f"{block.dtype}{list(block.shape)}".encode(), digest_size=_DIGEST_BYTES)
        digest.update(block.view(torch.uint8).cpu().numpy())
        digests.append(digest.digest())
    return digests


def _image_digests(prompt_ids: Sequence[int], images: Sequence[ImageForInsert],
                   known: Mapping[int, Sequence[bytes]]) -> dict[int, list[bytes]] | None:
    """Start-token position → digest of the features inserted after it (None: images and
    start tokens do not pair up, which the fusion refuses anyway)."""
    digests: dict[int, list[bytes]] = {}
    for item in images:
        if item.image_features is None:
            return None
        positions = [i for i, token in enumerate(prompt_ids) if token == item.insert_start_token]
        values = known.get(item.insert_start_token)
        values = image_digests(item) if values is None else values
        if len(positions) != len(values):
            return None
        for position, digest in zip(positions, values, strict=True):
            digests.setdefault(position, []).append(digest)
    return digests


def prefix_block_keys(prompt_ids: Sequence[int], images: Sequence[ImageForInsert], block_size: int,
                      salt: str | None = None, known_digests: Mapping[int, Sequence[bytes]] | None = None) -> list[bytes]:
    """Chained keys of the full blocks of ``prompt_ids`` before its last position.

    A ``salt`` (the request's ``cache_salt``) starts the chain, so salted prompts match
    only prompts of the same salt, and unsalted ones only unsalted ones.
    ``known_digests``: per start token, the :func:`image_digests` of that kind's images
    in order, where the caller has them already (they are not hashed again)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    count = (len(prompt_ids) - 1) // block_size
    if count <= 0:
        return []
    digests = _image_digests(prompt_ids, images, known_digests or {})
    if digests is None:
        return []
    keys: list[bytes] = []
    previous = b"" if salt is None else hashlib.blake2b(salt.encode(), digest_size=_DIGEST_BYTES,
                                                        person=b"cache-salt").digest()
    for index in range(count):
        first, end = index * block_size, (index + 1) * block_size
        key = hashlib.blake2b(previous, digest_size=_DIGEST_BYTES)
        key.update(array("q", prompt_ids[first:end]).tobytes())
        for position in range(first, end):
            for digest in digests.get(position, ()):
                key.update(digest)
        previous = key.digest()
        keys.append(previous)
    return keys


class PrefixCache:
    """A pool of cached KV blocks keyed by :func:`prefix_block_keys`; engine thread only."""

    def __init__(self, cache: KVCache, *, block_size: int, max_blocks: int) -> None:
        if block_size < 1 or max_blocks < 1:
            raise ValueError(f"need block_size >= 1 and max_blocks >= 1, got {block_size} and {max_blocks}")
        self.cache = cache
        self.block_size = block_size
        self.max_blocks = max_blocks
        template = cache.keys[0] if cache.keys else torch.empty(0)  # [slots, kv_heads, max_seq, D]
        shape = (max_blocks, template.shape[1], block_size, template.shape[3])
        # Never read before written: empty, so an unused pool costs no memory on the CPU.
        self.keys = [torch.empty(shape, dtype=template.dtype, device=template.device) for _ in cache.keys]
        self.values = [torch.empty(shape, dtype=template.dtype, device=template.device) for _ in cache.keys]
        self._blocks: OrderedDict[bytes, int] = OrderedDict()  # key → pool index, least recent first
        self._free = list(range(max_blocks - 1, -1, -1))

    @classmethod
    def within(cls, cache: KVCache, *, block_size: int, max_bytes: int) -> PrefixCache | None:
        """As many blocks as fit in ``max_bytes`` (None when not one does)."""
        if not cache.keys:
            return None
        template = cache.keys[0]
        block_bytes = 2 * len(cache.keys) * template.shape[1] * block_size * template.shape[3] * template.element_size()
        max_blocks = max_bytes // block_bytes
        return cls(cache, block_size=block_size, max_blocks=max_blocks) if max_blocks >= 1 else None

    def __len__(self) -> int:
        return len(self._blocks)

    def held(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the first, the pool holds (a look that marks nothing used)."""
        count = 0
        while count < len(keys) and keys[count] in self._blocks:
            count += 1
        return count

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """Pool indices of the longest run of ``keys`` held, from the first; marks them used."""
        found = []
        for key in keys:
            index = self._blocks.get(key)
            if index is None:
                break
            found.append(index)
        self._mark_used(keys[: len(found)])
        return found

    def _mark_used(self, keys: Sequence[bytes]) -> None:
        """Most recent last, a prompt's first block last of all: eviction takes a prompt's
        tail before its head, whose loss would strand every block after it."""
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def load(self, slot: int, blocks: Sequence[int]) -> int:
        """Copy ``blocks`` into the empty ``slot`` as its first positions; how many."""
        if not blocks:
            return 0
        if self.cache.length(slot) != 0:
            raise ValueError(f"slot {slot} already holds {self.cache.length(slot)} positions")
        length = len(blocks) * self.block_size
        if length > self.cache.max_seq_len:
            raise ValueError(f"{length} cached positions exceed max_seq_len={self.cache.max_seq_len}")
        index = torch.tensor(list(blocks), dtype=torch.long, device=self.keys[0].device)
        for pool, target in ((self.keys, self.cache.keys), (self.values, self.cache.values)):
            for layer, stored in enumerate(pool):
                run = stored.index_select(0, index).transpose(0, 1)  # [kv_heads, n, block, D]
                target[layer][slot, :, :length].copy_(run.flatten(1, 2))  # [kv_heads, n·block, D]
        self.cache.advance([slot], [length])
        return length

    def store(self, slot: int, keys: Sequence[bytes]) -> int:
        """Keep the blocks of ``slot`` that ``keys`` name and the pool lacks; how many it took.

        ``slot`` must hold at least ``len(keys)`` blocks' worth of positions, written by the
        prompt those keys were made from. A prompt longer than the pool keeps its first
        ``max_blocks`` blocks: taking more would evict blocks this very call stored.
        """
        keys = keys[: self.max_blocks]
        if self.cache.length(slot) < len(keys) * self.block_size:
            raise ValueError(f"slot {slot} holds {self.cache.length(slot)} positions, fewer than "
                             f"{len(keys)} blocks of {self.block_size}")
        sources, targets, added = [], [], []
        for position, key in enumerate(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            if self._free:
                index = self._free.pop()
            else:
                _, index = self._blocks.popitem(last=False)
            self._blocks[key] = index
            added.append(key)
            sources.append(position)
            targets.append(index)
        try:
            if sources:
                self._copy_out(slot, len(keys), sources, targets)
        except BaseException:
            # Half-written blocks must not be found: forget them (what they evicted is gone).
            for key in added:
                self._free.append(self._blocks.pop(key))
            raise
        self._mark_used(keys)
        return len(sources)

    def _copy_out(self, slot: int, blocks: int, sources: list[int], targets: list[int]) -> None:
        device = self.keys[0].device
        source = torch.tensor(sources, dtype=torch.long, device=device)
        target_index = torch.tensor(targets, dtype=torch.long, device=device)
        span = blocks * self.block_size
        for pool, cached in ((self.keys, self.cache.keys), (self.values, self.cache.values)):
            for layer, stored in enumerate(pool):
                run = cached[layer][slot, :, :span].unflatten(1, (blocks, self.block_size))  # [kv, n, block, D]
                stored.index_copy_(0, target_index, run.index_select(1, source).transpose(0, 1))
