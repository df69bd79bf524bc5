"""Block swap (`memory.block_swap: N`): the first N of the denoiser's blocks keep their frozen weights in CPU memory
and stream to the accelerator just before they run, forward and backward, leaving it again after. Which modules are
"the blocks" is the family table's `swap_blocks` (Flux's double- and single-stream transformer blocks, SD3's
transformer blocks, the UNet's down, mid and up blocks), in the order the forward pass runs them.

The frozen weights move by replacing their `.data`: what autograd saved for the backward pass is the parameter
itself, so it follows the move, and nothing keeps the accelerator copy alive. Trained weights (the LoRA inside a
block) and their gradients stay on the accelerator, where the optimizer steps them.

Forward: a block's pre-hook brings it in (on CUDA the next swapped block is already on its way on a side stream)
and its hook sends it out. Backward runs the blocks in reverse: a hook on a block's outputs, called when their
gradient is ready, brings it in again (and prefetches the one before it), and sends out the block after it, whose
backward is then complete. The first
block stays in after the backward: the next forward pass starts with it. A block recomputed by gradient
checkpointing runs its forward inside the backward pass, where its hook must not send it out.

The moves go through a `Mover`; `trainer estimate` passes one that moves the bytes in its memory count instead of
moving tensors, so the trace runs these same hooks.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves


def swap_blocks(denoiser: torch.nn.Module, roots: tuple[str, ...]) -> list[torch.nn.Module]:
    """The denoiser's blocks under the family's `roots`, in forward order (a root that is one module, such as the
    UNet's mid_block, is one block)."""
    blocks = []
    for root in roots:
        module = denoiser.get_submodule(root)
        blocks += list(module) if isinstance(module, torch.nn.ModuleList) else [module]
    return blocks


def frozen_tensors(block: torch.nn.Module) -> list[torch.Tensor]:
    """What moves: the block's frozen parameters and its buffers."""
    return [p for p in block.parameters() if not p.requires_grad] + list(block.buffers())


class Mover:
    """Moves a block's frozen tensors between the accelerator and CPU memory. On CUDA the host copies are pinned and
    a prefetch copies on a side stream, which the compute stream waits for before the block runs."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pending: set[int] = set()  # blocks being prefetched
        # The CPU copy of each tensor, made once: frozen weights never change, so sending a block out again is only
        # dropping its accelerator copy, with no copy back.
        self.host: dict[int, torch.Tensor] = {}

    def to_host(self, index: int, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            kept = self.host.get(id(t))
            if kept is None:
                kept = self.host[id(t)] = t.data.to("cpu").pin_memory() if self.cuda else t.data.to("cpu")
            t.data = kept
            _quant_state_to(t, "cpu")

    def to_device(self, index: int, tensors: list[torch.Tensor], prefetch: bool = False) -> None:
        if prefetch and self.cuda:
            with torch.cuda.stream(self.stream):
                self._move_in(tensors)
            self.pending.add(index)
        else:
            self._move_in(tensors)

    def ready(self, index: int, tensors: list[torch.Tensor]) -> None:
        """Before block `index` runs: the compute stream waits for its prefetch, and the copies it made are marked
        as used there (so the allocator does not hand their memory to the side stream while they are in use)."""
        if index in self.pending:
            self.pending.discard(index)
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for t in tensors:
                t.data.record_stream(current)

    def _move_in(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            t.data = t.data.to(self.device, non_blocking=self.cuda)
            _quant_state_to(t, self.device)


def _quant_state_to(t: torch.Tensor, device) -> None:
    # bitsandbytes' 4-bit weights keep their block scales beside the data.
    state = getattr(t, "quant_state", None)
    if state is not None:
        state.to(device)


class BlockSwap:
    """Hooks on `blocks` that keep the first `count` of them off the accelerator except while they run."""

    def __init__(self, blocks: list[torch.nn.Module], count: int, mover: Mover):
        self.blocks, self.count, self.mover = blocks, count, mover
        self.tensors = [frozen_tensors(block) for block in blocks[:count]]
        self.inside: set[int] = set()  # swapped blocks now on the accelerator
        self.handles = []
        for index in range(count):
            block = blocks[index]
            self.handles += [block.register_forward_pre_hook(lambda m, a, i=index: self._before_forward(i)),
                             block.register_forward_hook(lambda m, a, out, i=index: self._after_forward(i, out))]
            self._out(index)

    def _in(self, index: int, prefetch: bool = False) -> None:
        if 0 <= index < self.count and index not in self.inside:
            self.inside.add(index)
            self.mover.to_device(index, self.tensors[index], prefetch)

    def _out(self, index: int) -> None:
        if 0 <= index < self.count:
            self.inside.discard(index)
            self.mover.to_host(index, self.tensors[index])

    def _before_forward(self, index: int) -> None:
        self._in(index)
        self.mover.ready(index, self.tensors[index])
        self._in(index + 1, prefetch=True)

    def _after_forward(self, index: int, out) -> None:
        if torch._C._current_graph_task_id() != -1:  # a recomputation inside the backward pass: still needed
            return
        self._out(index)
        # The backward pass reaches the block when it reaches its outputs' gradients. Hooks on those tensors, not
        # the module's full backward hooks: those add nodes to the graph, which changes the order gradients are
        # summed in, and the result in the last bits.
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda grad, i=index: self._before_backward(i))

    def _before_backward(self, index: int) -> None:
        self._in(index)
        self.mover.ready(index, self.tensors[index])
        self._out(index + 1)
        self._in(index - 1, prefetch=True)
        # (returns None: the gradient passes unchanged)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
