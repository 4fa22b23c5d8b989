"""The running batch's key/value memory: fixed slots, allocated once, each row left-aligned in its slot.

Slot s holds one request: columns [0, P) its prefix, then its prompt, then what it generated, so the
position id of the token at column c is c itself (PEFT's rule: real tokens start at position P).
Active rows occupy slots [0, num_active); a finished row's slot is refilled by moving the last active
row into it, so a decode step always runs over a contiguous view `[:num_active, :, :view_len]`.
Shapes are fixed (slots, capacity) so the decode step can later be compiled with bucketed view lengths.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from server.registry.format import ModelFingerprint


class SlotKV:
    """Per-layer K/V of `max_slots` rows, capacity grown in powers of two up to `max_capacity`."""

    def __init__(
        self, fp: ModelFingerprint, max_slots: int, max_capacity: int, dtype, device, capacity: int = 64
    ):
        self.fp, self.max_slots, self.max_capacity = fp, max_slots, max_capacity
        self.dtype, self.device = dtype, torch.device(device)
        self.capacity = 0
        self.keys = torch.empty(0)  # [layers, max_slots, kv_heads, capacity, head_dim]
        self.values = torch.empty(0)
        self.lengths = torch.zeros(
            max_slots, dtype=torch.long, device=self.device
        )  # [max_slots] filled columns
        self.num_active = 0
        # Set before each decode step; read by the cache layers.
        self.view_len = 0
        self.rows = torch.arange(max_slots, device=self.device)  # [max_slots]
        self.ensure_capacity(min(capacity, max_capacity))

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    @torch.inference_mode()  # always inference tensors: the compiled step's guards expect one kind
    def ensure_capacity(self, needed: int) -> None:
        """Grow every slot to hold `needed` columns (rare: capacity doubles)."""
        if needed <= self.capacity:
            return
        if needed > self.max_capacity:
            raise ValueError(f"a row needs {needed} cache columns, the maximum is {self.max_capacity}")
        capacity = max(self.capacity, 64)
        while capacity < needed:
            capacity *= 2
        capacity = min(capacity, self.max_capacity)
        shape = (self.fp.num_layers, self.max_slots, self.fp.kv_heads, capacity, self.fp.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.capacity:
            keys[:, :, :, : self.capacity] = self.keys
            values[:, :, :, : self.capacity] = self.values
        self.keys, self.values, self.capacity = keys, values, capacity

    def write_row(self, slot: int, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Fill one slot of one layer. keys, values: [kv_heads, length, head_dim]."""
        length = keys.shape[1]
        self.keys[layer][slot, :, :length] = keys
        self.values[layer][slot, :, :length] = values
        self.lengths[slot] = length

    def move_row(self, src: int, dst: int) -> None:
        """Copy slot `src` into slot `dst` (used to keep active rows contiguous)."""
        length = int(self.lengths[src])
        self.keys[:, dst, :, :length] = self.keys[:, src, :, :length]
        self.values[:, dst, :, :length] = self.values[:, src, :, :length]
        self.lengths[dst] = length

    def free_row(self, slot: int) -> None:
        """Mark a slot free (length 0: a compiled step's padding row then sees and writes column 0 only)."""
        self.lengths[slot] = 0

    def decode_view(self) -> tuple[torch.Tensor, torch.Tensor, SlotCache]:
        """Position ids [n, 1], an additive attention mask [n, 1, 1, view_len], and the cache for one step."""
        positions, mask = self.step_inputs(self.num_active)
        self.view_len = mask.shape[-1]
        return positions, mask, SlotCache(self)

    def step_inputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids [rows, 1] and an additive mask [rows, 1, 1, length] for a step whose new K/V go to
        each row's own column: row r sees columns <= its position. For the compiled step, rows past the
        active ones pad the batch (free slots: length 0, they see only their own column 0)."""
        positions = self.lengths[:rows]  # [rows] the new token's column == its position
        columns = torch.arange(int(positions.max()) + 1, device=self.device)  # [length]
        allowed = columns[None, :] <= positions[:, None]  # [rows, length]
        return positions[:, None].clone(), self._additive_mask(allowed)

    def _additive_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """[n, length] bool -> [n, 1, 1, length]: 0 where allowed, the dtype's minimum elsewhere."""
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask[:, None, None, :]


class _SlotLayer(CacheLayerMixin):
    """One layer's view of the slots: writes each row's new key at its own column."""

    is_sliding = False

    def __init__(self, slots: SlotKV, layer: int):
        super().__init__()
        self.slots, self.layer = slots, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated by SlotKV
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states: [n, kv_heads, 1, head_dim] -> the rows' whole K/V [n, kv_heads, view_len, head_dim]."""
        s = self.slots
        n = s.num_active
        rows, cols = s.rows[:n], s.lengths[:n]
        k, v = s.keys[self.layer], s.values[self.layer]
        k[rows, :, cols] = key_states[:, :, 0]
        v[rows, :, cols] = value_states[:, :, 0]
        return k[:n, :, : s.view_len], v[:n, :, : s.view_len]

    def get_seq_length(self) -> int:
        return max(self.slots.view_len - 1, 0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slots.view_len, 0

    def get_max_length(self) -> int:
        return self.slots.capacity


class SlotCache(Cache):
    """A transformers Cache over SlotKV for one decode step (query length 1 per row)."""

    def __init__(self, slots: SlotKV):
        super().__init__(layers=[_SlotLayer(slots, i) for i in range(slots.fp.num_layers)])
