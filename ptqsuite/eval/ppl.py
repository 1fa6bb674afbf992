"""Perplexity by the GPTQ protocol (IST-DASLab/gptq, datautils.py and llama.py's eval loop).

The evaluation text (data.eval_text: e.g. WikiText-2 test rows joined with "\\n\\n") is tokenized once as a whole,
cut into non-overlapping windows of ``seqlen`` tokens (the tail shorter than a window is dropped), each window is
scored with the causal LM loss, and ``ppl = exp(mean over windows of the window's mean token NLL)``. All windows
have the same number of scored tokens, so this is also the token-level mean.

Special tokens follow the model's tokenizer over the whole text, exactly as GPTQ does (Llama tokenizers add one
BOS at the start of the text). Models trained on BOS-led documents (``bos_per_window``, e.g. stories260K) instead
get a BOS before each window of ``seqlen - 1`` text tokens; every text token is scored. ``seqlen`` is capped by the
model's context length. Deviation from GPTQ: windows are batched; the NLL is accumulated in float64.

With a ``reference`` model, the first ``kld_windows`` windows also give the mean per-token KL divergence
KL(P_reference || P_model) in nats (as llama.cpp's ``--kl-divergence``): it measures how far quantization moved the
whole next-token distribution, and stays informative where perplexity is not (random-init models, near-lossless
formats).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..arch import arch_of

LOGITS_BUDGET_BYTES = 1 << 30  # fp32 logits of one batch; sets the default batch size


@dataclass(frozen=True)
class PplResult:
    ppl: float
    nll: float  # mean token NLL (log ppl)
    nll_std: float  # spread of per-window mean NLL: the evaluation's own resolution is nll_std / sqrt(windows)
    windows: int
    tokens: int  # scored tokens
    seqlen: int
    protocol: str
    kld: float | None = None
    kld_windows: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=16)
def _token_ids(tokenizer, text_name: str, text: str, add_special_tokens: bool) -> torch.Tensor:
    # Tokenizers are hashable by identity: one cache entry per (loaded tokenizer, dataset).
    return torch.tensor(tokenizer(text, add_special_tokens=add_special_tokens).input_ids, dtype=torch.long)


def windows(tokenizer, eval_text, seqlen: int, bos_per_window: bool, max_windows: int | None) -> torch.Tensor:
    """The ``[n, seqlen]`` token windows the protocol scores."""
    ids = _token_ids(tokenizer, eval_text.name, eval_text.text, not bos_per_window)
    body = seqlen - 1 if bos_per_window else seqlen
    n = ids.numel() // body
    for cap in (eval_text.max_windows, max_windows):
        n = min(n, cap) if cap else n
    if n == 0:
        raise ValueError(f"{eval_text.name}: {ids.numel()} tokens make no window of {body}")
    w = ids[: n * body].view(n, body)
    if bos_per_window:
        w = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), w], dim=1)
    return w


@torch.no_grad()
def perplexity(model, tokenizer, eval_text, *, seqlen: int = 2048, bos_per_window: bool = False,
               max_windows: int | None = None, batch_size: int | None = None,
               reference=None, kld_windows: int = 0, progress=None) -> PplResult:
    config = arch_of(model).config(model)  # the language model's sizes (a VLM's text config)
    seqlen = min(seqlen, getattr(config, "max_position_embeddings", None) or seqlen)  # none: no limit (Mamba)
    w = windows(tokenizer, eval_text, seqlen, bos_per_window, max_windows)
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch_size(seqlen, config.vocab_size)
    kld_windows = min(kld_windows, len(w)) if reference is not None else 0
    if reference is not None and not isinstance(reference, ReferenceLogProbs):
        reference = ReferenceLogProbs(reference)
    per_window, kld = [], []
    for start in range(0, len(w), batch_size):
        batch = w[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        # rows of [tokens, vocab]: the row-wise log-softmax; the [batch, vocab, tokens] layout takes CUDA's spatial
        # kernel, 85 % of an H200's ppl time on SmolLM2 (benchmarks/results/ppl_h200.md)
        nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none").view(len(batch), -1)
        per_window.append(nll.double().mean(dim=1).cpu())
        if start < kld_windows:
            kld.append(_kl(reference, batch[: kld_windows - start], logits))
        if progress:
            progress(min(start + batch_size, len(w)), len(w))
    per_window = torch.cat(per_window)
    nll = per_window.mean().item()
    protocol = f"{eval_text.protocol}; seqlen={seqlen}; bos={'per-window' if bos_per_window else 'tokenizer'}"
    return PplResult(
        ppl=math.exp(nll), nll=nll, nll_std=per_window.std().item() if len(per_window) > 1 else 0.0,
        windows=len(w), tokens=len(w) * (seqlen - 1), seqlen=seqlen, protocol=protocol,
        kld=torch.cat(kld).mean().item() if kld else None, kld_windows=kld_windows,
    )


class ReferenceLogProbs:
    """The unquantized model's log-probabilities on KL windows, computed once per batch of windows and kept while
    they fit ``budget_bytes``: every case of a model scores KL on the same windows, and recomputing them is a full
    reference forward per case (SmolLM2 on a CPU: 13 s a window). Same computation, same numbers."""

    def __init__(self, model, budget_bytes: int = 0):
        self.model, self.budget, self._kept, self._used = model, budget_bytes, {}, 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        key = (tuple(batch.shape), str(batch.device), hashlib.sha256(batch.cpu().numpy().tobytes()).hexdigest())
        if key in self._kept:
            return self._kept[key]
        ref = F.log_softmax(self.model(batch, use_cache=False).logits[:, :-1].float(), dim=-1)
        size = ref.numel() * ref.element_size()
        if self._used + size <= self.budget:
            self._kept[key], self._used = ref, self._used + size
        return ref


def _kl(reference: ReferenceLogProbs, batch: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-window mean KL(P_ref || P) over the scored positions, in float64."""
    ref = reference(batch)
    log_p = F.log_softmax(logits[: len(batch)], dim=-1)
    return (ref.exp() * (ref - log_p)).sum(-1).double().mean(dim=1).cpu()


def default_batch_size(seqlen: int, vocab: int) -> int:
    return max(1, min(64, LOGITS_BUDGET_BYTES // (seqlen * vocab * 4)))
