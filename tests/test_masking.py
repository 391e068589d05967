"""One rule for every op and backend: whatever a masked-out position holds (NaN, ±inf, garbage)
reaches no output and no gradient. Each op runs on a clean input and on the same input with its
masked positions poisoned, on every backend; outputs and gradients must be bitwise equal."""

import pytest
import torch

import ppo_fast as pf

# Forcing triton runs the ops that have no Triton kernel on their reference, with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:PPO_FAST_BACKEND=triton:UserWarning")

F64 = torch.float64
POISONS = [float("nan"), float("inf"), float("-inf"), 1e30]


@pytest.fixture(params=["reference", "triton"])
def backend(request, force_backend):
    with force_backend(request.param):
        yield request.param


def poisoned(t, mask, value):
    """``t`` with every position outside ``mask`` (broadcast over trailing dims) set to value."""
    keep = mask.bool().reshape(mask.shape + (1,) * (t.dim() - mask.dim()))
    return torch.where(keep, t, torch.full_like(t, value))


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    elif isinstance(a, (tuple, list)):
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert torch.equal(a, b), (a, b)


def _mask(device, B=3, T=7):
    mask = torch.rand(B, T, device=device) > 0.35
    mask[:, 0] = True
    mask[-1] = False
    return mask


@pytest.mark.parametrize("poison", POISONS)
def test_ppo_loss(poison, device, backend):
    B, T, V = 3, 7, 61
    mask = _mask(device)
    logits = torch.randn(B, T, V, dtype=F64, device=device)
    labels = torch.randint(0, V, (B, T), device=device)
    old, adv, ref, rollout = (torch.randn(B, T, dtype=F64, device=device) for _ in range(4))

    def run(logits, labels, old, adv, ref, rollout):
        x = logits.clone().requires_grad_()
        loss, metrics = pf.ppo_loss(x, labels, old, adv, mask, ref_logp=ref, rollout_logp=rollout,
                                    kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0,
                                    agg="seq-mean-token-mean")
        (grad,) = torch.autograd.grad(loss, x)
        return loss, metrics, grad

    clean = run(logits, labels, old, adv, ref, rollout)
    garbage_labels = torch.where(mask, labels, torch.full_like(labels, V + 5))
    dirty = run(poisoned(logits, mask, poison), garbage_labels,
                *(poisoned(t, mask, poison) for t in (old, adv, ref, rollout)))
    assert_same(clean, dirty)
    assert (clean[2][~mask] == 0).all()


@pytest.mark.parametrize("poison", POISONS)
def test_policy_and_value_losses(poison, device, backend):
    mask = _mask(device)
    logp, old, adv, rollout, values, returns = (torch.randn(3, 7, dtype=F64, device=device)
                                                for _ in range(6))

    def run(logp, old, adv, rollout, values, old_values, returns):
        lp, v = logp.clone().requires_grad_(), values.clone().requires_grad_()
        ploss, pmetrics = pf.policy_loss(lp, old, adv, mask, rollout_logp=rollout, dual_clip=2.0)
        vloss, vmetrics = pf.value_loss(v, old_values, returns, mask, clip=0.2)
        grads = torch.autograd.grad(ploss + vloss, (lp, v))
        return ploss, pmetrics, vloss, vmetrics, grads

    clean = run(logp, old, adv, rollout, values, values + 0.1, returns)
    dirty = run(*(poisoned(t, mask, poison) for t in (logp, old, adv, rollout, values, values + 0.1,
                                                         returns)))
    assert_same(clean, dirty)


@pytest.mark.parametrize("poison", POISONS)
def test_gae_padded_and_packed(poison, device, backend):
    mask = _mask(device, B=3, T=40)
    rewards, values = torch.randn(3, 40, dtype=F64, device=device), torch.randn(3, 40, dtype=F64, device=device)
    clean = pf.gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=False)
    dirty = pf.gae(poisoned(rewards, mask, poison), poisoned(values, mask, poison), mask, gamma=0.99, lam=0.95, whiten=False)
    assert_same(clean, dirty)
    assert (clean[0][~mask] == 0).all() and (clean[1][~mask] == 0).all()
    cu = torch.tensor([0, 40, 80, 120], device=device)
    packed = pf.gae(poisoned(rewards, mask, poison).reshape(-1), poisoned(values, mask, poison).reshape(-1),
                    mask.reshape(-1), gamma=0.99, lam=0.95, cu_seqlens=cu, whiten=False)
    assert_same((clean[0].reshape(-1), clean[1].reshape(-1)), packed)


@pytest.mark.parametrize("poison", POISONS)
def test_statistics(poison, device, backend):
    mask = _mask(device)
    values = torch.randn(3, 7, dtype=F64, device=device)
    dirty = poisoned(values, mask, poison)
    for shift_mean in (True, False):
        assert_same(pf.masked_whiten(values, mask, shift_mean=shift_mean),
                    pf.masked_whiten(dirty, mask, shift_mean=shift_mean))
    assert_same(pf.masked_mean(values, mask), pf.masked_mean(dirty, mask))
    scores = torch.randn(3, dtype=F64, device=device)
    groups = torch.tensor([0, 0, 1], device=device)
    adv = pf.group_advantages(scores, groups, mask)
    assert (adv[~mask] == 0).all() and torch.isfinite(adv).all()


@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0, float("nan")])
def test_masks_hold_only_zero_and_one(bad):
    x = torch.randn(2, 4)
    mask = torch.ones(2, 4)
    mask[1, 2] = bad
    for call in (lambda: pf.masked_mean(x, mask), lambda: pf.masked_whiten(x, mask),
                 lambda: pf.policy_loss(x, x, x, mask), lambda: pf.value_loss(x, x, x, mask),
                 lambda: pf.gae(x, x, mask, whiten=False), lambda: pf.ppo_loss(torch.randn(2, 4, 5),
                                                                 torch.zeros(2, 4, dtype=torch.long),
                                                                 x, x, mask)):
        with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
            call()
    assert pf.masked_mean(x, torch.ones(2, 4, dtype=torch.long)).isfinite()


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_ppo_loss_is_differentiable_in_the_logits_only(backend_name, force_backend):
    logits = torch.randn(2, 5, 9, requires_grad=True)
    labels = torch.randint(0, 9, (2, 5))
    old, adv, ref = (torch.randn(2, 5, requires_grad=True) for _ in range(3))
    with force_backend(backend_name):
        loss, _ = pf.ppo_loss(logits, labels, old, adv, torch.ones(2, 5), ref_logp=ref, kl_coef=0.1)
        loss.backward()
    assert logits.grad is not None
    assert old.grad is None and adv.grad is None and ref.grad is None


def test_empty_batches_give_empty_results():
    empty = torch.empty(0, 6)
    assert pf.masked_whiten(torch.empty(0), torch.empty(0, dtype=torch.bool)).shape == (0,)
    adv, ret = pf.gae(empty, empty, whiten=False)
    assert adv.shape == ret.shape == (0, 6)
    assert pf.group_advantages(torch.empty(0), torch.empty(0, dtype=torch.long)).shape == (0,)
    assert pf.token_logprobs(torch.empty(0, 5), torch.empty(0, dtype=torch.long)).shape == (0,)
    loss, _ = pf.policy_loss(empty, empty, empty, empty.bool())
    assert loss.item() == 0
