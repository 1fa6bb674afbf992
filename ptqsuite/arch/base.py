"""The shape of an architecture entry: where things are, as data. Methods ask an ``Arch``, never a module name.

A block's linears come in groups that read the same input: ``(source, linears)`` where ``source`` is the op whose
output feeds them: a norm, the preceding linear, or ``None`` for a nonlinearity (Mamba's convolution, a gated
product) through which no scale or rotation can be moved. Transforms use the pairs (fold a norm into the q/k/v that
follow it, smooth up_proj into down_proj); mitigation iterates the linears in this order (true-sequential order).

Mixture-of-experts blocks write a group once for every expert: a name with ``{e}`` expands to each expert index of
the block's expert list (``Arch.experts``). Two views of a block's groups follow from that:

* ``stages(block)``: each declared group with its expansions, the unit of true-sequential calibration. An expanded
  group's linears read the tokens routed to that expert, so each gets its own Hessian;
* ``input_groups(block)``: the groups merged by source, what a transform sees: one norm feeds the router, every
  expert and any shared expert, so a folded gain or a migrated scale must reach all of them at once.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import nn

EXPERT = "{e}"


@dataclass(frozen=True)
class LinearGroup:
    source: str | None  # the op whose output the linears read; None: a nonlinearity (nothing moves through it)
    linears: tuple[str, ...]  # quantized, in true-sequential order
    scope: str | None = None  # the smallest module whose output judges a change to these linears (AWQ's
    # module2inspect): the attention for q/k/v, the MLP for gate/up; None: the linears themselves
    kept: tuple[str, ...] = ()  # modules that read the same input but stay in high precision (MoE routers): a
    # transform rewrites them with the group, so the model still computes what it did; nothing quantizes them
    reader: str | None = None  # a module that reads the group's input for every token (a router; default: the
    # first linear, which under routing sees only its expert's tokens): where input statistics are observed
    tap: str | None = None  # for linears the model applies through their weight without calling them (Mamba's
    # dt_proj in transformers 5): the module whose output's first ``in_features`` columns are their input
    routed: bool = False  # an expansion for one expert: its linears see only the tokens routed to that expert

    @property
    def rewritten(self) -> tuple[str, ...]:
        """Every module reading the group's input, which a transform of that input must rewrite: its linears, then
        the ones it keeps in high precision."""
        return self.linears + self.kept

    @property
    def observed(self) -> str:
        return self.reader or self.linears[0]

    def expand(self, e: int) -> "LinearGroup":
        sub = lambda name: name.replace(EXPERT, str(e)) if name else name  # noqa: E731
        return LinearGroup(sub(self.source), tuple(map(sub, self.linears)), sub(self.scope),
                           tuple(map(sub, self.kept)), sub(self.reader), sub(self.tap), routed=True)

    @property
    def per_expert(self) -> bool:
        return any(EXPERT in n for n in (self.source or "", *self.linears))


@dataclass(frozen=True)
class Arch:
    name: str
    model_types: tuple[str, ...]
    blocks: str
    embed: str
    final_norm: str
    head: str
    groups: tuple[LinearGroup, ...]
    prologue: tuple[str, ...] = ()  # modules that compute block 0's inputs (run on the compute device to capture them)
    attention: str | None = "self_attn"  # the module that applies RoPE and attends (K and V are quantized inside
    # it); None: the block has no attention and no KV cache (Mamba)
    residual_writers: tuple[str, ...] = ()  # linears whose outputs are added to the residual stream
    online_rotated: tuple[str, ...] = ()  # linears whose inputs a rotation can only reach online (after a nonlinearity)
    value_out: tuple[str, str] | None = None  # (V projection, attention output projection): per-head rotatable
    experts: str | None = None  # the block's list of experts (MoE), whose indices ``{e}`` in group names range over
    text_config: str | None = None  # the sub-config with the language model's sizes (LLaVA: "text_config")
    stream_inputs: tuple[str, ...] = ()  # linears outside the blocks whose outputs enter the residual stream
    # beside the embedding's (LLaVA's projector writes image features there): a rotation of the stream reaches them
    loader: str = "AutoModelForCausalLM"  # the transformers auto class that builds and loads the whole model
    prepare: Callable[[nn.Module, "Arch"], None] | None = None  # rewrites a loaded model into the form the groups name
    # (MoE experts stored as 3-D tensors become one module of nn.Linear per expert); computes what it did
    init: Callable | None = None  # (parameter name, tensor, generator) -> value or None: random-init overrides for
    # parameters with a required structure (Mamba's A_log, D and dt bias)
    notes: str = ""  # what the entry keeps in high precision, and why

    def config(self, model: nn.Module):
        """The configuration holding the language model's sizes (the model's own, or its text sub-config)."""
        return getattr(model.config, self.text_config) if self.text_config else model.config

    def heads(self, model: nn.Module) -> tuple[int, int, int]:
        """(attention heads, key/value heads, head dim) from the config, as every llama-like model names them."""
        c = self.config(model)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim

    def block_list(self, model: nn.Module) -> list[nn.Module]:
        return list(model.get_submodule(self.blocks))

    def expert_count(self, block: nn.Module) -> int:
        return len(block.get_submodule(self.experts)) if self.experts else 0

    def names(self, block: nn.Module, names: tuple[str, ...]) -> list[str]:
        """Module names with ``{e}`` expanded over the block's experts (``residual_writers``, ``online_rotated``)."""
        n = self.expert_count(block)
        return [m for name in names for m in ([name.replace(EXPERT, str(e)) for e in range(n)] if EXPERT in name
                                               else [name])]

    def stages(self, block: nn.Module) -> list[tuple[LinearGroup, ...]]:
        """Each declared group with its expansions over the block's experts (one group if it is not per expert)."""
        count = self.expert_count(block)
        return [tuple(g.expand(e) for e in range(count)) if g.per_expert else (g,) for g in self.groups]

    def groups_of(self, block: nn.Module) -> list[LinearGroup]:
        """Every group of the block, expanded: each one's linears read one tensor (one Hessian)."""
        return [g for stage in self.stages(block) for g in stage]

    def input_groups(self, block: nn.Module) -> list[LinearGroup]:
        """The groups merged by source, in order of first appearance: every module reading one op's output."""
        merged: dict = {}
        for i, g in enumerate(self.groups_of(block)):
            key = g.source if g.source is not None else i
            m = merged.get(key)
            merged[key] = g if m is None else replace(
                m, linears=m.linears + g.linears, scope=m.scope or g.scope, reader=m.reader or g.reader,
                kept=m.kept + tuple(k for k in g.kept if k not in m.kept))
        return list(merged.values())

    def norm_groups(self, block: nn.Module) -> list[LinearGroup]:
        """Input groups fed by a norm (folded and smoothed into their linears): a source no linear produces."""
        produced = {name for g in self.groups_of(block) for name in g.linears}
        return [g for g in self.input_groups(block) if g.source is not None and g.source not in produced]

    def linears(self, block: nn.Module) -> list[tuple[str, nn.Linear]]:
        return [(name, block.get_submodule(name)) for g in self.groups_of(block) for name in g.linears]

    def quantizable(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        """Every linear a weight recipe quantizes, with its full name. Embeddings, the head and ``kept`` modules stay
        in high precision, as in GPTQ, AWQ and QuaRot's weight-only settings."""
        return [
            (f"{self.blocks}.{i}.{name}", linear)
            for i, block in enumerate(self.block_list(model))
            for name, linear in self.linears(block)
        ]
