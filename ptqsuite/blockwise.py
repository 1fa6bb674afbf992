"""Calibration data flowing through a model block by block: the one loop every calibrated step shares.

Only block 0's inputs are computed by the model itself (its prologue modules, embedding and rotary, on the compute
device; a hook on block 0 stops the forward there). From then on each block, moved alone to the compute device,
turns its inputs into the next block's, in micro-batches sized to bound the activations' memory.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .arch import Arch

CHUNK_BYTES = 1 << 29  # per block forward: bounds the intermediate activations (Llama-3-8B bf16: 6 k tokens)


class Stop(Exception):
    """Raised by a hook to end a forward early: the rest of it is not needed."""


def chunk_size(arch: Arch, model, seqlen: int) -> int:
    """Calibration sequences per block forward: the widest linear's outputs (the MLP's intermediate activations,
    held about three times over) stay within ``CHUNK_BYTES``."""
    block = arch.block_list(model)[0]
    widest = max(linear.out_features for _, linear in arch.linears(block))
    per_token = 3 * widest * next(block.parameters()).element_size()
    return max(1, CHUNK_BYTES // (per_token * seqlen))


def forward(block, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def capture(model, arch: Arch, calibration: torch.Tensor, device: torch.device, chunk: int):
    """Block 0's inputs (hidden states on ``device``, one tensor per micro-batch) and keyword arguments."""
    prologue = [model.get_submodule(name) for name in arch.prologue]
    homes = [next(m.parameters(), next(m.buffers(), None)) for m in prologue]
    homes = [h.device if h is not None else device for h in homes]
    for m in prologue:
        m.to(device)
    inputs, kwargs = [], []

    def catch(module, args, kw):
        hidden = args[0] if args else kw.pop("hidden_states")
        inputs.append(hidden)
        kwargs.append(kw)
        raise Stop

    handle = arch.block_list(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in calibration.split(chunk):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except Stop:
                pass
    finally:
        handle.remove()
        for m, home in zip(prologue, homes):
            m.to(home)
    return inputs, kwargs


def walk(model, arch: Arch, calibration: torch.Tensor, device: torch.device, watch: tuple[str, ...] = (),
         on_call=None) -> Iterator[tuple[int, torch.nn.Module]]:
    """Yields ``(index, block)`` with the block on ``device`` after it turned its calibration inputs into the next
    block's, one forward per block; during it, ``on_call(index, name, args, kwargs)`` saw every call of each
    submodule named in ``watch``. The consumer must leave the block computing what it did."""
    inputs, kwargs = capture(model, arch, calibration, device, chunk_size(arch, model, calibration.shape[1]))
    for b, block in enumerate(arch.block_list(model)):
        home = next(block.parameters()).device
        block.to(device)
        handles = [block.get_submodule(name).register_forward_pre_hook(
            lambda module, args, kw, name=name, b=b: on_call(b, name, args, kw), with_kwargs=True) for name in watch]
        try:
            inputs = [forward(block, x, kw) for x, kw in zip(inputs, kwargs)]
        finally:
            for h in handles:
                h.remove()
        yield b, block
        block.to(home)
