"""Live tensor memory, counted by storage: every storage an op creates is added with the part it belongs to, and
removed when it is freed; the peak and what was alive at it are kept. Works on fake tensors and on real ones.

torch's own MemTracker refuses frozen parameters (it expects every parameter to train), so this is our own.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Within `with counter:` every op's output storages are counted under the current `part`; tensors that
    existed before (weights, inputs) are added with `add`. `peak_by_part()` splits the peak."""

    def __init__(self, part: str = "activations"):
        super().__init__()
        self.part = part
        # storage address -> (serial, bytes, part); an address is reused once its storage is freed, the serial
        # never is, so the snapshot at the peak is keyed by serial.
        self.live: dict[int, tuple[int, int, str]] = {}
        self.total = 0
        self.peak = 0
        self._serial = 0
        self._watch: dict[int, weakref.ref] = {}  # storage address -> the weak reference that reports its end
        self._at_peak: dict[int, tuple[int, str]] = {}  # serial -> (bytes, part)
        self._rising = False  # the total reached a new peak and nothing was freed since: snapshot at the next free

    def add(self, tensor: torch.Tensor, part: str) -> None:
        """Count `tensor`'s storage under `part`, once however many tensors view it."""
        storage = tensor.untyped_storage()
        key = storage._cdata  # the storage's address: the same for every view of it while it lives
        if key in self.live:
            return
        size = storage.nbytes()
        self._serial += 1
        self.live[key] = (self._serial, size, part)
        self._watch[key] = weakref.ref(storage, lambda _, key=key: self._free(key))  # lighter than finalize
        self.total += size
        if self.total > self.peak:
            self.peak, self._rising = self.total, True

    def remove(self, tensor: torch.Tensor) -> None:
        """Stop counting `tensor`'s storage, as if it were freed (it left the device being counted)."""
        key = tensor.untyped_storage()._cdata
        if key in self.live:
            self._free(key)

    def relabel(self, tensor: torch.Tensor, part: str) -> None:
        """Count `tensor`'s storage under `part` from now on, and at the peak (a gradient is made by an op in
        the backward pass and known as one only afterwards)."""
        key = tensor.untyped_storage()._cdata
        if key not in self.live:
            return
        serial, size, _ = self.live[key]
        self.live[key] = (serial, size, part)
        if serial in self._at_peak:
            self._at_peak[serial] = (size, part)

    @contextmanager
    def counting_as(self, part: str):
        previous, self.part = self.part, part
        try:
            yield
        finally:
            self.part = previous

    def live_by_part(self) -> dict[str, int]:
        """Bytes alive now, by part."""
        out: dict[str, int] = {}
        for _, size, part in self.live.values():
            out[part] = out.get(part, 0) + size
        return out

    def peak_by_part(self) -> dict[str, int]:
        """Bytes alive at the peak, by part."""
        self._snapshot_if_rising()
        out: dict[str, int] = {}
        for size, part in self._at_peak.values():
            out[part] = out.get(part, 0) + size
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):  # most ops: no need to walk a tree
            self.add(out, self.part)
        else:
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self.add(leaf, self.part)
        return out

    def _free(self, key: int) -> None:
        self._snapshot_if_rising()
        _, size, _ = self.live.pop(key)
        del self._watch[key]
        self.total -= size

    def _snapshot_if_rising(self) -> None:
        # Copying what is alive at every new high would be quadratic; it is enough to copy it when the total
        # turns down from one.
        if self._rising:
            self._at_peak = {serial: (size, part) for serial, size, part in self.live.values()}
            self._rising = False
