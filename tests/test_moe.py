"""Mixture-of-experts support (ptqsuite/arch/moe.py, the pipeline's per-expert calibration): the unfused experts
compute what transformers' do, each expert is calibrated on the tokens routed to it, starved experts fall back to
the identity Hessian as documented, and routers stay in high precision. Function preservation of the transforms on
these layouts is in test_transforms.py, with every other architecture."""
import copy

import pytest
import torch

from ptqsuite import data, models, pipeline
from ptqsuite.arch import arch_of
from ptqsuite.arch.moe import Experts
from ptqsuite.recipe import parse

MOE = ["mixtral-tiny-random", "qwen2-moe-tiny-random"]
KEPT = ("mlp.gate", "mlp.shared_expert_gate")  # routers: never quantized (those the model has)


@pytest.fixture(scope="module", params=MOE)
def loaded(request):
    return models.load(models.get(request.param), "cpu", torch.float32)


def ids(loaded, n: int, seqlen: int, seed: int = 0):
    return data.calibration("c4", loaded.tokenizer, n, seqlen, seed)


def top_k(model) -> int:
    return model.config.num_experts_per_tok


def test_unfused_experts_compute_what_transformers_does(loaded):
    """Bit for bit against transformers' eager experts loop (the default grouped GEMM differs by rounding only)."""
    fused = models.build_random(loaded.spec).eval()
    x = ids(loaded, 2, 64)
    with torch.no_grad():
        grouped = fused(x).logits
        fused.config._experts_implementation = "eager"
        eager = fused(x).logits
        ours = loaded.model(x).logits
    assert all(isinstance(b.mlp.experts, Experts) for b in arch_of(loaded.model).block_list(loaded.model))
    assert torch.equal(ours, eager)
    assert torch.allclose(ours, grouped, atol=1e-4, rtol=0)


def routed_counts(model, x) -> dict[str, int]:
    """Tokens each expert's gate_proj sees in one forward: what its Hessian must be built from."""
    counts, handles = {}, []
    for name, module in model.named_modules():
        if name.endswith("gate_proj") and ".experts." in name:
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: counts.__setitem__(name, counts.get(name, 0) + args[0].shape[0])))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return counts


def test_each_expert_is_calibrated_on_its_routed_tokens(loaded, monkeypatch):
    """Every expert's Hessian counts exactly the tokens routed to it, and the counts over a block's experts sum to
    tokens × top-k: a Hessian built from all tokens, or from another expert's, fails this."""
    model, x = copy.deepcopy(loaded.model), ids(loaded, 12, 128)  # ~600 tokens per expert: none starved
    arch, seen = arch_of(model), {}
    names = {id(m): n for n, m in model.named_modules()}
    inner = pipeline._quantize_linears

    def record(linears, stats, plan, clips):
        seen[names[id(linears[0])]] = stats.n
        return inner(linears, stats, plan, clips)

    expected = routed_counts(model, x)
    monkeypatch.setattr(pipeline, "_quantize_linears", record)
    # not true-sequential (.par): block 0's Hessians all come from the unquantized block, whose routing the
    # unquantized model's forward shows (true-sequential GPTQ routes on the quantized attention's output)
    report = pipeline.quantize(model, parse("gptq.par-w4g64"), arch, x)
    first = {n: c for n, c in expected.items() if n.startswith(f"{arch.blocks}.0.")}
    assert {n: seen[n] for n in first} == first
    assert sum(first.values()) == x.numel() * top_k(model)
    assert report.fallbacks == {}


def test_starved_experts_fall_back_to_round_to_nearest(loaded):
    """With fewer routed tokens than an expert's input width its Hessian is singular: the documented fallback
    solves it with the identity Hessian, where GPTQ is exactly RTN. The report lists each such linear."""
    x = ids(loaded, 1, 24)
    gptq, rtn = copy.deepcopy(loaded.model), copy.deepcopy(loaded.model)
    report = pipeline.quantize(gptq, parse("gptq-w4g64"), arch_of(gptq), x)
    pipeline.quantize(rtn, parse("rtn-w4g64"), arch_of(rtn))
    starved = {n for n in report.fallbacks if ".experts." in n}
    assert starved and all(report.fallbacks[n] < 256 for n in starved)
    assert not any(".experts." not in n for n in report.fallbacks)  # dense linears are never substituted
    weights = dict(gptq.named_parameters())
    for name, param in rtn.named_parameters():
        if name.removesuffix(".weight") in starved:
            assert torch.equal(weights[name], param), name
    attention = [n for n, _ in arch_of(gptq).quantizable(gptq) if "self_attn" in n]
    assert any(not torch.equal(weights[f"{n}.weight"], dict(rtn.named_parameters())[f"{n}.weight"])
               for n in attention)  # GPTQ did run where calibration sufficed


def test_routers_stay_in_high_precision(loaded):
    model = copy.deepcopy(loaded.model)
    report = pipeline.quantize(model, parse("rtn-w3g64"), arch_of(model))
    arch, before = arch_of(model), dict(loaded.model.named_parameters())
    for b, block in enumerate(arch.block_list(model)):
        for name in (n for n in KEPT if hasattr(block.mlp, n.split(".")[-1])):
            assert torch.equal(block.get_submodule(name).weight, before[f"{arch.blocks}.{b}.{name}.weight"])
    experts = arch.expert_count(arch.block_list(model)[0])
    shared = 3 if hasattr(arch.block_list(model)[0].mlp, "shared_expert") else 0
    assert report.linears == len(arch.block_list(model)) * (4 + 3 * experts + shared)
    changed = [n for n, p in model.named_parameters() if ".experts." in n and not torch.equal(p, before[n])]
    assert len(changed) == len(arch.block_list(model)) * 3 * experts
