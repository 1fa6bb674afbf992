"""Apply a recipe to a model: the one place that walks blocks and swaps in quantized weights.

Weights are fake-quantized: each linear's weight is replaced by its dequantized codes (plus a compensation term,
if the recipe has one) in the model's dtype, which is what the accuracy cases evaluate.

A recipe without calibration quantizes every linear on its own. One with calibration runs the sequential loop
(GPTQ's ``llama_sequential``, written once for every architecture through ``arch.py``):

1. capture block 0's inputs for the calibration sequences (the prologue modules, embedding and rotary, run on
   the compute device; a hook on block 0 stops the forward there);
2. per block, moved alone to the compute device: per stage (one stage per input group of linears when the solver
   is true-sequential, else one stage for the whole block), hooks accumulate each input group's Hessian while the
   block runs the calibration micro-batches, stopping as soon as every linear of the stage has seen its input;
   then each linear of the stage is clipped, solved and compensated, and its weight replaced;
3. the quantized block's outputs on its inputs become the next block's inputs, so each block is calibrated on
   what the quantized model before it produces.

Mixture-of-experts blocks: an expert's Hessian is collected from the tokens the router sends it (its linears'
own inputs), all of one stage's experts in one forward. The router is never overridden: calibration sees the
routing the model does. An expert that receives fewer calibration tokens than its input width (``Stats.n < in_features``: its Hessian is singular, fitted to fewer tokens than unknowns) is solved
with the identity Hessian instead: GPTQ then reduces exactly to round-to-nearest and a clipping search to weight
MSE. The report lists each such linear with its token count (``fallbacks``).

A block-level clipping step (OmniQuant's LWC) also needs the full-precision model's activations: then a second
stream runs the unquantized blocks, and its outputs are LWC's targets. GPU memory holds one block, its stage's
Hessians and the calibration activations (one stream, two with LWC); the rest of the model stays where it was.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import torch

from .arch import Arch
from .blockwise import Stop, capture, chunk_size, forward, walk
from .granularity import PerTensor
from .mitigation import METHODS
from .mitigation.stats import Hessian, Stats
from .activations import quantize_io
from .recipe import Recipe
from .transforms import TRANSFORMS

SLICE_ELEMENTS = 1 << 25  # weight elements solved at once: bounds the solvers' fp32 copies (128 MiB each)


@dataclass(frozen=True)
class QuantReport:
    linears: int
    quantized_params: int
    bits_per_weight: float  # over quantized linears: scales, zero points and compensation factors included
    model_bytes: int  # quantized linears at their effective bits, every other parameter at 16 bits
    timings: dict = field(default_factory=dict)  # seconds per phase: capture, forward, hessian, solve, ...
    fallbacks: dict = field(default_factory=dict)  # linear -> calibration tokens it saw, where too few for its
    # Hessian (an expert the router rarely chose): solved with the identity Hessian
    transforms: dict = field(default_factory=dict, repr=False)  # each transform step's fitted state

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "transforms"}


@dataclass(frozen=True)
class _Plan:
    """The recipe's mitigation steps as (module, options) per role; None where the recipe has none."""

    spec: object
    clip: tuple | None
    solve: tuple
    compensate: tuple | None

    @classmethod
    def of(cls, recipe: Recipe) -> "_Plan":
        def role(name):
            step = recipe.step(name)
            return None if step is None else (METHODS[step.name], METHODS[step.name].options(step))
        return cls(recipe.weight, role("clip"), role("solve"), role("compensate"))

    @property
    def sequential(self) -> bool:
        return getattr(self.solve[1], "true_sequential", True)

    @property
    def calibrated(self) -> bool:
        """Whether any mitigation step reads calibration data (the transforms may, on their own)."""
        return any(step[0].needs_calibration for step in (self.clip, self.solve, self.compensate) if step)

    @property
    def needs_stats(self) -> bool:
        """Whether a per-linear step reads the layers' Hessians (``lwc+rtn`` needs calibration, but no Hessian)."""
        per_linear = [self.solve, self.compensate] + ([] if self.block_clip else [self.clip])
        return any(step is not None and step[0].needs_calibration for step in per_linear)

    @property
    def block_clip(self) -> bool:
        return self.clip is not None and hasattr(self.clip[0], "train")


class _Timer(dict):
    """Seconds per phase. On CUDA it synchronizes at each phase boundary, so work lands in the phase that queued it."""

    sync = False

    def add(self, phase: str, since: float) -> float:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self[phase] = self.get(phase, 0.0) + now - since
        return now


def unsupported(recipe: Recipe, arch: Arch) -> str | None:
    """Why ``recipe`` cannot run on ``arch`` (None: it can), read from the architecture's data alone, before any
    model is loaded: a KV-cache format where the blocks do not attend, or a transform whose module rejects the
    architecture (``unsupported_on(arch)``)."""
    if recipe.kv is not None and arch.attention is None:
        return f"{recipe.kv.token('kv')} on {arch.name}: its blocks have no attention, so there is no KV cache"
    for step in recipe.transforms:
        reason = getattr(TRANSFORMS[step.name], "unsupported_on", lambda arch: None)(arch)
        if reason:
            return f"transform {step} on {arch.name}: {reason}"
    return None


@torch.no_grad()
def quantize(model: torch.nn.Module, recipe: Recipe, arch: Arch, calibration: torch.Tensor | None = None,
             device: torch.device | str | None = None, progress=None) -> QuantReport:
    """Quantize ``model`` in place. ``calibration``: token ids ``[n, seqlen]`` (recipes that need it);
    ``device``: where blocks are computed (default: where the model is); ``progress(done, total, what)``."""
    plan, timer = _Plan.of(recipe), _Timer()
    reason = unsupported(recipe, arch)
    if reason:
        raise ValueError(f"recipe {recipe} does not apply: {reason}")
    if recipe.needs_calibration and calibration is None:
        raise ValueError(f"recipe {recipe} needs calibration data (its steps {sorted(recipe.names)} use it)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    timer.sync = device.type == "cuda"
    states = _transform(model, arch, recipe, calibration, device, timer)
    linears = arch.quantizable(model)
    if recipe.weight.fmt is None:
        bits = {name: 16.0 * linear.weight.numel() for name, linear in linears}
    elif not plan.calibrated:
        bits = {}
        for i, (name, linear) in enumerate(linears):
            t = time.perf_counter()
            bits[name] = _quantize_linear(linear, None, plan, None)
            timer.add("solve", t)
            if progress:
                progress(i + 1, len(linears), name)
    else:
        bits, fallbacks = _sequential(model, arch, plan, calibration, device, timer, progress)
    # after the weights: calibration saw unquantized activations (online rotations included), as QuaRot's code does
    static = quantize_io(model, arch, recipe.act, recipe.kv)
    if static:
        t = time.perf_counter()
        _calibrate_static(model, arch, static, calibration, device)
        timer.add("static_scales", t)
    qparams = sum(linear.weight.numel() for _, linear in linears)
    total_params = sum(p.numel() for p in model.parameters())
    total_bits = sum(bits.values())
    return QuantReport(
        linears=len(linears), quantized_params=qparams, bits_per_weight=total_bits / qparams,
        model_bytes=round((total_bits + 16 * (total_params - qparams)) / 8),
        timings={k: round(v, 3) for k, v in timer.items()}, transforms=states,
        fallbacks=fallbacks if plan.calibrated and recipe.weight.fmt is not None else {},
    )


def _calibrate_static(model, arch: Arch, quantizers: list, calibration: torch.Tensor, device) -> None:
    """Fit static activation and KV scales: the calibration set runs through the weight-quantized model (block by
    block, as calibration does) with every static quantizer observing its input's range and passing it on
    unquantized (dynamic ones quantize as they will), then each freezes its range into scales."""
    for _ in walk(model, arch, calibration, device):
        pass
    for quantizer in quantizers:
        quantizer.freeze()


def _transform(model, arch: Arch, recipe: Recipe, calibration, device, timer: _Timer) -> dict:
    """Fit and apply the recipe's transforms in order; returns each one's state by its step id."""
    states = {}
    for step in recipe.transforms:
        t = time.perf_counter()
        module = TRANSFORMS[step.name]
        state = module.fit(model, arch, calibration, recipe, module.options(step), device)
        module.apply(model, arch, state)
        states[str(step)] = state
        timer.add(f"transform.{step}", t)
    return states


def _quantize_linear(linear: torch.nn.Linear, stats, plan: _Plan, clip) -> float:
    """Replace ``linear``'s weight by its fake-quantized value; returns the bits it takes stored."""
    return _quantize_linears([linear], stats, plan, [clip])[0]


def _quantize_linears(linears: list, stats, plan: _Plan, clips: list) -> list[float]:
    """Quantize linears that read the same input (one ``stats``); returns the bits each takes stored.

    Where every step treats rows independently (no NVFP4 tensor scale or per-tensor granularity tying them, no
    low-rank term, which is one per linear), the linears' rows are one stack, solved in slices of about
    ``SLICE_ELEMENTS``: small linears (SmolLM2's q/k/v) go together, one solve instead of three; large ones
    (Llama-3-8B's gate/up, 28672 rows) go in parts, so the solver's fp32 copies stay small. Either way it is the
    same computation as one linear at a time."""
    Ws = [linear.weight.data for linear in linears]
    if _rows_independent(plan):
        for pieces in _row_slices([W.shape[0] for W in Ws], Ws[0].shape[1]):
            W = torch.cat([Ws[k][a:b].float() for k, a, b in pieces])
            W_hat, _ = _mitigate(W, stats, plan, _clip_rows(clips, pieces))
            for (k, a, b), part in zip(pieces, W_hat.split([b - a for _, a, b in pieces])):
                Ws[k][a:b] = part.to(Ws[k].dtype)
        extra = [0.0] * len(Ws)
    else:
        extra = []
        for linear, W, clip in zip(linears, Ws, clips):
            W_hat, e = _mitigate(W.float(), stats, plan, clip)
            linear.weight.data = W_hat.to(W.dtype)
            extra.append(e)
    return [W.numel() * plan.spec.fmt.bits_per_element(tuple(W.shape), plan.spec.gran) + e for W, e in zip(Ws, extra)]


def _row_slices(rows: list[int], cols: int) -> list[list[tuple[int, int, int]]]:
    """The stacked rows of several matrices cut into slices of at most ``SLICE_ELEMENTS // cols`` rows, each slice
    a list of ``(matrix, first row, end row)``."""
    budget, slices, current, used = max(1, SLICE_ELEMENTS // cols), [], [], 0
    for k, n in enumerate(rows):
        a = 0
        while a < n:
            b = min(n, a + budget - used)
            current.append((k, a, b))
            used += b - a
            a = b
            if used == budget:
                slices.append(current)
                current, used = [], 0
    return slices + ([current] if current else [])


def _clip_rows(clips: list, pieces: list):
    """The clipping ratios (per linear: None, a tensor ``[R, G, 1]`` or a pair of them) of a slice's rows."""
    if all(clips[k] is None for k, _, _ in pieces):
        return None
    if isinstance(clips[pieces[0][0]], tuple):
        return tuple(torch.cat([clips[k][i][a:b] for k, a, b in pieces]) for i in range(2))
    return torch.cat([clips[k][a:b] for k, a, b in pieces])


def _rows_independent(plan: _Plan) -> bool:
    return (plan.compensate is None and not getattr(plan.spec.fmt, "tensor_scale", False)
            and not isinstance(plan.spec.gran, PerTensor))


def _mitigate(W: torch.Tensor, stats, plan: _Plan, clip) -> tuple[torch.Tensor, float]:
    """Clip, solve, compensate one fp32 weight: the dequantized result and the compensation's extra bits."""
    if plan.clip is not None and clip is None:
        module, options = plan.clip
        clip = module.search(W, stats, plan.spec, options)
    module, options = plan.solve
    W_hat = module.solve(W, stats, plan.spec, options, clip).dequantize()
    if plan.compensate is None:
        return W_hat, 0.0
    module, options = plan.compensate
    A, B = module.compensate(W, W_hat, stats, options)
    return W_hat + A @ B, module.extra_bits(tuple(W.shape), options)


def _sequential(model, arch: Arch, plan: _Plan, calibration: torch.Tensor, device: torch.device, timer: _Timer,
                progress) -> tuple[dict[str, float], dict[str, int]]:
    t = time.perf_counter()
    chunk = chunk_size(arch, model, calibration.shape[1])
    inputs, kwargs = capture(model, arch, calibration, device, chunk)
    fp_inputs = list(inputs) if plan.block_clip else None
    t = timer.add("capture", t)
    blocks, bits, fallbacks = arch.block_list(model), {}, {}
    for b, block in enumerate(blocks):
        home = next(block.parameters()).device
        block.to(device)
        t = timer.add("move", t)
        run = lambda x, i: forward(block, x, kwargs[i])  # noqa: E731 (the block of this iteration)
        clips = {}
        if plan.block_clip:
            targets = [run(x, i) for i, x in enumerate(fp_inputs)]
            t = timer.add("forward", t)
            module, options = plan.clip
            xs, ys, kws = _sequences(inputs, targets, kwargs)
            clips, _ = module.train(arch.linears(block), xs, ys, lambda x, k: forward(block, x, kws[k]),
                                    plan.spec, options)
            fp_inputs = targets
            t = timer.add("clip", t)
        for stage in _stages(arch, block, plan.sequential if plan.needs_stats else False):
            hessians = _collect(block, stage, inputs, run, device, timer) if plan.needs_stats else None
            t = time.perf_counter()
            for group in stage:
                layers = [block.get_submodule(name) for name in group.linears]
                stats = hessians.pop(group).stats() if hessians is not None else None
                if stats is not None and group.routed and stats.n < layers[0].in_features:
                    fallbacks.update((f"{arch.blocks}.{b}.{name}", stats.n) for name in group.linears)
                    stats = Stats.identity(layers[0].in_features, device)
                if stats is not None:
                    stats.last_use = plan.clip is None and plan.compensate is None  # only the solver reads it
                done = _quantize_linears(layers, stats, plan, [clips.get(name) for name in group.linears])
                del stats
                bits.update((f"{arch.blocks}.{b}.{name}", n) for name, n in zip(group.linears, done))
            del hessians
            t = timer.add("solve", t)
        inputs = [run(x, i) for i, x in enumerate(inputs)]
        t = timer.add("forward", t)
        block.to(home)
        t = timer.add("move", t)
        if progress:
            progress(b + 1, len(blocks), f"block {b}")
    return bits, fallbacks


def _sequences(inputs: list, targets: list, kwargs: list) -> tuple[list, list, list]:
    """Micro-batches split into single calibration sequences (views), with their keyword arguments: a training step
    is one sequence whatever the memory-bound micro-batch size is (OmniQuant's batch size 1)."""
    xs, ys, kws = [], [], []
    for x, y, kw in zip(inputs, targets, kwargs):
        for j in range(x.shape[0]):
            xs.append(x[j:j + 1])
            ys.append(y[j:j + 1])
            kws.append({k: _select(v, j, x.shape[0]) for k, v in kw.items()})
    return xs, ys, kws


def _select(v, j: int, batch: int):
    """Sequence ``j`` of a batched keyword argument: tensors of 2+ dimensions whose first is the batch (position ids,
    rotary cos/sin, a 4-D attention mask), inside tuples too; anything else (cache positions, flags) as it is."""
    if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == batch:
        return v[j:j + 1]
    if isinstance(v, tuple):
        return tuple(_select(u, j, batch) for u in v)
    return v


def _stages(arch: Arch, block, sequential: bool) -> list[tuple]:
    """True-sequential: one stage per declared group (with its expansions over experts, which do not read each
    other's outputs); otherwise the whole block is one stage."""
    stages = arch.stages(block)
    return stages if sequential else [tuple(g for stage in stages for g in stage)]


def _collect(block, stage: tuple, inputs: list, run, device, timer: _Timer) -> dict:
    """Each group's Hessian over the calibration inputs, with the block as it is now, by group. The forward stops
    once every linear of the stage has been called (or its tap, for linears applied through their weight)."""
    hessians = {g: Hessian(block.get_submodule(g.linears[0]).in_features, device) for g in stage}
    waiting, handles, mark = set(), [], [time.perf_counter()]

    def accumulate(group):
        def hook(module, args, output=None):
            mark[0] = timer.add("forward", mark[0])  # on CUDA it synchronizes: the forward so far counts as forward
            x = args[0] if group.tap is None else output[..., :hessians[group].H.shape[0]]
            hessians[group].add_batch(x)
            mark[0] = timer.add("hessian", mark[0])
        return hook

    def seen(name):
        def hook(module, args, output):
            waiting.discard(name)
            if not waiting:
                raise Stop
        return hook

    watched = []
    for g in stage:
        if g.tap is None:
            handles.append(block.get_submodule(g.linears[0]).register_forward_pre_hook(accumulate(g)))
            watched += g.linears
        else:
            handles.append(block.get_submodule(g.tap).register_forward_hook(accumulate(g)))
            watched.append(g.tap)
    for name in dict.fromkeys(watched):
        handles.append(block.get_submodule(name).register_forward_hook(seen(name)))
    try:
        for i, x in enumerate(inputs):
            waiting.update(watched)
            try:
                run(x, i)
            except Stop:
                pass
            mark[0] = timer.add("forward", mark[0])
    finally:
        for h in handles:
            h.remove()
    return hessians
