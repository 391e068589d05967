"""Inputs, providers and byte counts shared by the pytest-benchmark suite and ``gpu_bench.py``.

A provider is a factory ``make(inputs) -> run`` where ``run()`` does the timed work once and
returns what the correctness check compares (outputs for a forward, ``dlogits`` for a
forward+backward). Factories raise :class:`Unavailable` with a reason when a provider cannot run
here, so both front ends skip it the same way.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch

import ppo_fast
from ppo_fast import dispatch, spec

GAMMA, LAM = 1.0, 0.95


class Unavailable(Exception):
    """This provider cannot run on this platform; the message says why."""


# --------------------------------------------------------------------------------------------
# Shapes and inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shapes:
    n_seqs: int  # B: logits are [B * seq_len, V], viewed as B sequences for Liger's GRPO loss
    seq_len: int
    vocab: int
    logits_dtype: torch.dtype
    gae_batch: int
    gae_len: int

    @property
    def tokens(self) -> int:
        return self.n_seqs * self.seq_len


# The shapes: a Qwen-sized vocabulary, 8192 tokens of bf16 logits per micro-batch.
CUDA_SHAPES = Shapes(n_seqs=8, seq_len=1024, vocab=151936, logits_dtype=torch.bfloat16,
                     gae_batch=512, gae_len=4096)
# Small enough that the whole CPU suite, eager baselines included, finishes in about a minute.
CPU_SHAPES = Shapes(n_seqs=4, seq_len=64, vocab=4096, logits_dtype=torch.float32,
                    gae_batch=64, gae_len=512)
# For gpu_bench.py --smoke: exercises every code path on the CPU in seconds.
SMOKE_SHAPES = Shapes(n_seqs=2, seq_len=16, vocab=512, logits_dtype=torch.bfloat16,
                      gae_batch=8, gae_len=64)

SUITE_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SUITE_SHAPES = CUDA_SHAPES if SUITE_DEVICE.type == "cuda" else CPU_SHAPES


@dataclass
class LogitsInputs:
    logits: torch.Tensor  # [N, V], N = B * L, contiguous
    labels: torch.Tensor  # [N] int64
    grad_weights: torch.Tensor  # [N] float32: a non-trivial upstream gradient for logp
    old_logp: torch.Tensor  # [N] float32, near the true log-probs so some ratios clip
    seq_advantages: torch.Tensor  # [B] float32 (Liger's GRPO loss takes one per sequence)
    advantages: torch.Tensor  # [N] float32, seq_advantages broadcast over each sequence
    mask: torch.Tensor  # [N] bool
    n_seqs: int

    @property
    def seq_len(self) -> int:
        return self.labels.numel() // self.n_seqs


@dataclass
class GaeInputs:
    rewards: torch.Tensor  # [B, T] float32
    values: torch.Tensor  # [B, T] float32
    mask: torch.Tensor  # [B, T] bool


def _true_logp(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """float32 log-probs by rows in chunks, so making inputs never needs an [N, V] fp32 copy."""
    out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, labels.numel(), chunk_rows):
        rows = logits[start:start + chunk_rows].float()
        out[start:start + chunk_rows] = (
            rows.gather(-1, labels[start:start + chunk_rows, None]).squeeze(-1)
            - rows.logsumexp(-1)
        )
    return out


def make_logits_inputs(shapes: Shapes, device, seed: int, mask_keep: float = 1.0) -> LogitsInputs:
    """Random (never zero) logits; ``mask_keep`` < 1 masks that fraction of tokens out at random."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n, v = shapes.tokens, shapes.vocab
    # Scale 2 gives peaked rows (entropy well under log V), closer to a trained model than N(0, 1).
    logits = (torch.randn(n, v, generator=gen, device=device) * 2).to(shapes.logits_dtype)
    labels = torch.randint(0, v, (n,), generator=gen, device=device)
    old_logp = _true_logp(logits, labels) + 0.1 * torch.randn(n, generator=gen, device=device)
    seq_adv = torch.randn(shapes.n_seqs, generator=gen, device=device)
    mask = torch.rand(n, generator=gen, device=device) < mask_keep
    return LogitsInputs(
        logits=logits, labels=labels,
        grad_weights=torch.randn(n, generator=gen, device=device),
        old_logp=old_logp, seq_advantages=seq_adv,
        advantages=seq_adv.repeat_interleave(shapes.seq_len), mask=mask, n_seqs=shapes.n_seqs,
    )


def make_gae_inputs(shapes: Shapes, device, seed: int) -> GaeInputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    size = (shapes.gae_batch, shapes.gae_len)
    return GaeInputs(
        rewards=torch.randn(size, generator=gen, device=device),
        values=torch.randn(size, generator=gen, device=device),
        # Mostly ones with scattered holes, as response masks with tool tokens look.
        mask=torch.rand(size, generator=gen, device=device) < 0.9,
    )


# --------------------------------------------------------------------------------------------
# Minimum bytes each op must move (the numerator of achieved bandwidth and of the floors)
# --------------------------------------------------------------------------------------------


def logits_bytes(inputs: LogitsInputs) -> int:
    return inputs.logits.numel() * inputs.logits.element_size()


def logprobs_fwd_bytes(inputs: LogitsInputs) -> int:
    """One read of the logits."""
    return logits_bytes(inputs)


def logits_fwd_bwd_bytes(inputs: LogitsInputs) -> int:
    """Read the logits in the forward, again in the backward, write dlogits once."""
    return 3 * logits_bytes(inputs)


def gae_bytes(inputs: GaeInputs) -> int:
    """Read rewards, values, mask; write advantages and returns (float32)."""
    reads = sum(t.numel() * t.element_size() for t in (inputs.rewards, inputs.values, inputs.mask))
    return reads + 2 * inputs.rewards.numel() * 4


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------


def logp_log_softmax(logits, labels):
    """verl's naive path: a float32 log_softmax over the whole vocabulary, then gather."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[:, None]).squeeze(-1)


def logp_gather_lse(logits, labels):
    """TRL's ``selective_log_softmax`` (its float32 branch): gather, minus logsumexp.

    The logsumexp runs on a float32 upcast: on bf16 logits torch returns a bf16 lse, whose
    rounding (0.06 at |lse| ≈ 12) would swamp the comparison. TRL itself loops over rows for
    bf16; the upcast keeps one launch and costs one float32 copy of the logits.
    """
    picked = logits.gather(-1, labels[:, None]).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


def logp_reference(logits, labels):
    return spec.token_logprobs(logits, labels)


def ppo_loss_reference(logits, labels, old_logp, advantages, mask):
    loss, _ = spec.ppo_loss(logits, labels, old_logp, advantages, mask)
    return loss


def gae_reference(rewards, values, mask):
    return spec.gae(rewards, values, mask, gamma=GAMMA, lam=LAM)


_compiled_cache: dict = {}


def compiled(fn):
    """torch.compile(fn), built once per function so every benchmark shares the compile."""
    if fn not in _compiled_cache:
        _compiled_cache[fn] = torch.compile(fn)
    return _compiled_cache[fn]


def liger_grpo_function():
    try:
        from liger_kernel.ops.grpo_loss import GrpoLossFunction
    except ImportError as exc:
        raise Unavailable(f"liger_kernel is not installed ({exc})") from None
    return GrpoLossFunction


def liger_selective_log_softmax():
    try:
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
    except ImportError as exc:
        raise Unavailable(f"liger_kernel is not installed ({exc})") from None
    return fused_selective_log_softmax


def require_cuda(inputs_device: torch.device, what: str) -> None:
    if inputs_device.type != "cuda":
        raise Unavailable(f"{what} is Triton-only and needs CUDA tensors")


def liger_grpo_per_token_loss(inputs: LogitsInputs, logits3d: torch.Tensor):
    """Liger's token-level GRPO loss on ``logits3d`` [B, L + 1, V] (it drops each sequence's
    last row, as after a causal shift); per-token loss [B, L], masked.

    Arguments go by name through the signature of the installed version, which grew new
    parameters (loss_type, reduce, ...) over releases; ``reduce=False`` where it exists.
    """
    grpo = liger_grpo_function()
    B = inputs.n_seqs
    L = inputs.seq_len
    wanted = dict(
        logits=logits3d, old_logp=inputs.old_logp.view(B, L), ref_logp=None,
        completion_ids=inputs.labels.view(B, L), advantages=inputs.seq_advantages,
        completion_mask=inputs.mask.view(B, L).to(torch.int32), temperature=1.0, beta=0.0,
        eps_low=0.2, eps_high=0.2, inplace=False, reduce=False, loss_type="bnpo",
    )
    params = list(inspect.signature(grpo.forward).parameters.values())[1:]  # drop ctx
    args = [wanted[p.name] if p.name in wanted else p.default for p in params]
    return grpo.apply(*args)[0]


def liger_logits(inputs: LogitsInputs) -> torch.Tensor:
    """The same logits laid out as Liger's [B, L + 1, V] (one unread row per sequence)."""
    B, L = inputs.n_seqs, inputs.seq_len
    V = inputs.logits.shape[-1]
    padded = torch.empty(B, L + 1, V, dtype=inputs.logits.dtype, device=inputs.logits.device)
    padded[:, :L] = inputs.logits.view(B, L, V)
    padded[:, L] = inputs.logits.view(B, L, V)[:, 0]  # never read, but not garbage either
    return padded


class ForcedBackend:
    """Run the public ppo_fast functions on one backend (PPO_FAST_BACKEND is read per call)."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.saved = os.environ.get(dispatch.ENV_VAR)
        os.environ[dispatch.ENV_VAR] = self.name

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop(dispatch.ENV_VAR, None)
        else:
            os.environ[dispatch.ENV_VAR] = self.saved


def _grad_of(loss_fn, logits, *args):
    """dlogits of loss_fn(logits, *args) without accumulating into .grad."""
    leaf = logits.detach().requires_grad_(True)
    (dlogits,) = torch.autograd.grad(loss_fn(leaf, *args), leaf)
    return dlogits


# token_logprobs forward -----------------------------------------------------------------------


def logprobs_fwd_providers():
    def eager(inp):
        return lambda: logp_log_softmax(inp.logits, inp.labels)

    def eager_lse(inp):
        return lambda: logp_gather_lse(inp.logits, inp.labels)

    def compiled_ref(inp):
        fn = compiled(logp_reference)
        return lambda: fn(inp.logits, inp.labels)

    def liger(inp):
        require_cuda(inp.logits.device, "Liger")
        selective = liger_selective_log_softmax()
        # Liger shifts internally: rows 0..N-2 of a [1, N, V] view are scored with the last
        # N-1 ids, so rolling the labels by one lines row i up with labels[i] (N-1 outputs).
        logits3d = inp.logits[None]
        ids = inp.labels.roll(1)[None].contiguous()
        return lambda: selective(logits3d, ids, 1.0).view(-1)

    def ppo_fast_fn(inp):
        return lambda: ppo_fast.token_logprobs(inp.logits, inp.labels)

    return dict(eager=eager, eager_lse=eager_lse, compiled=compiled_ref, liger=liger,
                ppo_fast=ppo_fast_fn)


# token_logprobs forward + backward ------------------------------------------------------------


def _weighted(logp_fn):
    def loss(logits, labels, weights):
        return (logp_fn(logits, labels) * weights).sum()
    return loss


_loss_log_softmax = _weighted(logp_log_softmax)
_loss_gather_lse = _weighted(logp_gather_lse)
_loss_reference = _weighted(logp_reference)
_loss_ppo_fast = _weighted(lambda logits, labels: ppo_fast.token_logprobs(logits, labels))


def logprobs_fwd_bwd_providers():
    def with_loss(loss_fn):
        def make(inp):
            return lambda: _grad_of(loss_fn, inp.logits, inp.labels, inp.grad_weights)
        return make

    def compiled_ref(inp):
        fn = compiled(_loss_reference)
        return lambda: _grad_of(fn, inp.logits, inp.labels, inp.grad_weights)

    def liger(inp):
        raise Unavailable("Liger has no differentiable token log-prob op "
                          "(fused_selective_log_softmax is forward-only)")

    return dict(eager=with_loss(_loss_log_softmax), eager_lse=with_loss(_loss_gather_lse),
                compiled=compiled_ref, liger=liger, ppo_fast=with_loss(_loss_ppo_fast))


# ppo_loss forward + backward ------------------------------------------------------------------


def _ppo_fast_loss(logits, labels, old_logp, advantages, mask):
    loss, _ = ppo_fast.ppo_loss(logits, labels, old_logp, advantages, mask)
    return loss


def ppo_loss_providers():
    def with_loss(loss_fn):
        def make(inp):
            return lambda: _grad_of(loss_fn, inp.logits, inp.labels, inp.old_logp,
                                    inp.advantages, inp.mask)
        return make

    def compiled_ref(inp):
        return with_loss(compiled(ppo_loss_reference))(inp)

    def liger(inp):
        require_cuda(inp.logits.device, "Liger")
        liger_grpo_function()
        logits3d = liger_logits(inp)
        B, L = inp.n_seqs, inp.seq_len
        mask = inp.mask.view(B, L).float()

        def run():
            leaf = logits3d.detach().requires_grad_(True)
            per_token = liger_grpo_per_token_loss(inp, leaf)
            loss = (per_token * mask).sum() / mask.sum().clamp(min=1)  # token-mean, as ours
            (dlogits,) = torch.autograd.grad(loss, leaf)
            return dlogits[:, :L].reshape(B * L, -1)  # a view: no copy inside the timing
        return run

    return dict(eager=with_loss(ppo_loss_reference), compiled=compiled_ref, liger=liger,
                ppo_fast=with_loss(_ppo_fast_loss))


# gae ------------------------------------------------------------------------------------------


def gae_providers():
    def eager(inp):
        return lambda: gae_reference(inp.rewards, inp.values, inp.mask)

    def compiled_ref(inp):
        raise Unavailable("torch.compile unrolls the Python loop over T: compiling T=512 took "
                          "100 s on a 2-core CPU, and T=4096 would take far longer")

    def liger(inp):
        raise Unavailable("Liger has no GAE op")

    def ppo_fast_fn(inp):
        return lambda: ppo_fast.gae(inp.rewards, inp.values, inp.mask, gamma=GAMMA, lam=LAM, whiten=False)

    return dict(eager=eager, compiled=compiled_ref, liger=liger, ppo_fast=ppo_fast_fn)


# --------------------------------------------------------------------------------------------
# float64 references, for the correctness checks
# --------------------------------------------------------------------------------------------


def reference_logp64(inp: LogitsInputs, rows: torch.Tensor) -> torch.Tensor:
    return spec.token_logprobs(inp.logits[rows].double(), inp.labels[rows])


def reference_logprobs_grad64(inp: LogitsInputs, rows: torch.Tensor) -> torch.Tensor:
    """The weighted-sum loss is a sum over rows, so a subset of rows has its exact gradient."""
    return _grad_of(_loss_reference, inp.logits[rows].double(), inp.labels[rows],
                    inp.grad_weights[rows].double())


def reference_ppo_grad64(inp: LogitsInputs, rows: torch.Tensor) -> torch.Tensor:
    """token-mean over the whole batch: pass its token count so a row subset keeps its weights."""
    num_tokens = float(inp.mask.sum().clamp(min=1))

    def loss(logits, labels, old_logp, advantages, mask):
        value, _ = spec.ppo_loss(logits, labels, old_logp, advantages, mask,
                                      num_tokens=num_tokens)
        return value

    return _grad_of(loss, inp.logits[rows].double(), inp.labels[rows],
                    inp.old_logp[rows].double(), inp.advantages[rows].double(), inp.mask[rows])


def reference_gae64(inp: GaeInputs):
    return spec.gae(inp.rewards.double(), inp.values.double(), inp.mask,
                         gamma=GAMMA, lam=LAM)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives NaN (which fails every check)."""
    diff = (out.double() - ref.double()).norm()
    return float(diff / ref.double().norm().clamp(min=1e-300))
