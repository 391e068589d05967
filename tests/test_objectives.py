"""Every policy objective (``loss_type``) through the public API: the fused path from logits equals
the spec in float64 (values, metrics, gradients) on every backend; masked positions reach nothing;
a token's loss does not depend on the rest of the batch where the objective says so; options are
checked. The objectives themselves are held against verl's, OpenRLHF's and TRL's own functions in
tests/integrations/."""

import numpy as np
import pytest
import torch

import ppo_fast as pf
from helpers import OBJECTIVE_PARAMS, assert_loss_matches_spec, random_labels, random_logits
from ppo_fast import objectives
from ppo_fast import spec as R

F64 = torch.float64

CASES = [(name, params) for name, options in OBJECTIVE_PARAMS.items() for params in options]
CASE_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in p.items()) or 'default'}" for name, p in CASES]
BATCH_WIDE = ("clip_cov", "kl_cov")


def _inputs(B, T, V, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (2 * torch.randn(B, T, V, generator=g, dtype=F64)).to(device=device, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    with torch.no_grad():
        lp = R.token_logprobs(logits.double(), labels)
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=F64).to(device)
    ref = lp + 0.3 * torch.randn(B, T, generator=g, dtype=F64).to(device)
    adv = (torch.randn(B, 1, generator=g, dtype=F64) + 0.3 * torch.randn(B, T, generator=g, dtype=F64)).to(device)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[-1] = False
    mask[0, :3] = True
    weights = (0.3 * torch.randn(B, T, generator=g, dtype=F64)).exp().to(device)
    return logits.requires_grad_(), labels, old, adv, mask.to(device), ref, weights


def _logp_inputs(B, T, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    old = -(torch.randn(B, T, generator=g, dtype=F64) + 1).abs()
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, 1, generator=g, dtype=F64) + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    weights = (0.3 * torch.randn(B, T, generator=g, dtype=F64)).exp()
    return [t.to(device) for t in (logp, old, adv, mask, weights)]


@pytest.mark.parametrize("loss_type, params", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_fused_path_matches_the_spec_float64(loss_type, params, agg, weighted, device, backend):
    """Unweighted token-level vanilla takes the one fused loss kernel, everything else the fused
    log-prob kernel and the objective: both must be the spec, with every parameter honoured."""
    logits, labels, old, adv, mask, ref, weights = _inputs(3, 7, 389, F64, device)
    kw = dict(loss_type=loss_type, loss_params=params, agg=agg, ref_logp=ref, kl_coef=0.05,
              entropy_coef=0.01, rollout_is_weights=weights if weighted else None)

    def seeded(fn):
        def call(*args, **kwargs):
            torch.manual_seed(3)  # clip_cov draws from the global generator
            return fn(*args, **kwargs)
        return call

    assert_loss_matches_spec(seeded(pf.ppo_loss), seeded(R.ppo_loss), logits, labels, old, adv, mask, **kw)


@pytest.mark.parametrize("loss_type", ["gspo", "sapo", "cispo", "geo_mean"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_logits_within_twice_the_eager_error(loss_type, dtype, device, backend):
    logits, labels, old, adv, mask, ref, _ = _inputs(4, 9, 1000, dtype, device)
    kw = dict(loss_type=loss_type, kl_coef=0.05, entropy_coef=0.01)

    x = logits.detach().double().requires_grad_()
    exact_loss, _ = R.ppo_loss(x, labels, old, adv, mask, ref_logp=ref, **kw)
    (exact_grad,) = torch.autograd.grad(exact_loss, x)

    x = logits.detach().requires_grad_()
    log_probs = torch.log_softmax(x, -1)
    logp = log_probs.gather(-1, labels[..., None])[..., 0].float()
    entropy = -(log_probs.exp() * log_probs).sum(-1).float()
    opts = R.LossOptions(**kw)
    terms = R.ppo_token_terms(logp, old.float(), adv.float(), opts, mask=mask, entropy=entropy,
                              ref_logp=ref.float())
    eager_loss, _ = R.reduce(terms, mask, opts)
    (eager_grad,) = torch.autograd.grad(eager_loss, x)

    loss, _ = pf.ppo_loss(logits, labels, old.float(), adv.float(), mask, ref_logp=ref.float(), **kw)
    (grad,) = torch.autograd.grad(loss, logits)
    err = lambda a, b: (a.double() - b.double()).abs().max().item()  # noqa: E731
    floor = 1e-6 if dtype == torch.float32 else 0.0
    assert err(loss, exact_loss) <= 2 * err(eager_loss, exact_loss) + floor
    assert err(grad, exact_grad) <= 2 * err(eager_grad, exact_grad) + floor


@pytest.mark.parametrize("loss_type, params", CASES, ids=CASE_IDS)
def test_masked_positions_reach_no_output_and_no_gradient(loss_type, params):
    logp, old, adv, mask, weights = _logp_inputs(5, 8)
    results = []
    for poison in (None, float("nan"), float("inf"), -1e30):
        def fill(t):
            return t if poison is None else t.masked_fill(~mask, poison)
        x = fill(logp).requires_grad_()
        torch.manual_seed(0)
        loss, metrics = pf.policy_loss(x, fill(old), fill(adv), mask, loss_type=loss_type, loss_params=params,
                                       rollout_is_weights=fill(weights), agg="seq-mean-token-mean")
        (grad,) = torch.autograd.grad(loss, x)
        results.append((loss, grad.masked_fill(~mask, 0), metrics, grad))
    clean = results[0]
    for loss, grad, metrics, raw_grad in results[1:]:
        assert torch.equal(loss, clean[0])
        assert torch.equal(grad, clean[1])
        assert (raw_grad[~mask] == 0).all()
        for name in metrics:
            assert torch.equal(metrics[name], clean[2][name]), name


@pytest.mark.parametrize("loss_type, params", [c for c in CASES if c[0] not in BATCH_WIDE],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if c[0] not in BATCH_WIDE])
def test_a_tokens_loss_does_not_depend_on_the_other_sequences(loss_type, params):
    """Up to rounding: PyTorch's CPU kernels take a vectorised or a scalar path for exp and
    sigmoid by an element's position, so the last bit may differ (the Triton kernels' outputs
    are bitwise batch-invariant, tests/test_backends.py)."""
    logp, old, adv, mask, weights = _logp_inputs(6, 9)
    opts = R.LossOptions(loss_type=loss_type, loss_params=params)
    whole = objectives.policy_terms(logp, old, adv, mask, opts, weights=weights)
    for row in range(6):
        alone = objectives.policy_terms(logp[row:row + 1], old[row:row + 1], adv[row:row + 1],
                                        mask[row:row + 1], opts, weights=weights[row:row + 1])
        for got, want in zip(alone, whole):
            torch.testing.assert_close(got[0], want[row], rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("loss_type, params", [c for c in CASES if c[0] not in objectives.WEIGHTS_INSIDE],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if c[0] not in objectives.WEIGHTS_INSIDE])
def test_importance_weights_multiply_each_tokens_term(loss_type, params):
    logp, old, adv, mask, weights = _logp_inputs(4, 6)
    opts = R.LossOptions(loss_type=loss_type, loss_params=params)
    torch.manual_seed(0)
    plain = objectives.policy_terms(logp, old, adv, mask, opts).pg
    torch.manual_seed(0)
    weighted = objectives.policy_terms(logp, old, adv, mask, opts, weights=weights).pg
    torch.testing.assert_close(weighted, plain * weights * mask, rtol=1e-14, atol=0)


def test_rollout_logp_truncated_weights_combine_with_rollout_is_weights():
    logp, old, adv, mask, weights = _logp_inputs(4, 6)
    rollout = old + 0.4 * torch.randn_like(old)
    truncated = (old - rollout).exp().clamp(max=1.5)
    for loss_type in ("vanilla", "sapo"):
        both, _ = pf.policy_loss(logp, old, adv, mask, loss_type=loss_type, rollout_logp=rollout, tis_cap=1.5,
                                 rollout_is_weights=weights)
        product, _ = pf.policy_loss(logp, old, adv, mask, loss_type=loss_type,
                                    rollout_is_weights=weights * truncated)
        torch.testing.assert_close(both, product, rtol=1e-14, atol=0)


@pytest.mark.parametrize("loss_type, params", CASES, ids=CASE_IDS)
def test_every_parameter_changes_the_loss_or_its_gradient(loss_type, params):
    """Each case's parameters differ from the defaults: they must reach the result."""
    if not params or loss_type in BATCH_WIDE or loss_type == "dro":
        return
    logp, old, adv, mask, _ = _logp_inputs(5, 8)
    old = old + 0.5 * torch.randn_like(old)
    results = []
    for given in ({}, params):
        x = logp.clone().requires_grad_()
        loss, _ = pf.policy_loss(x, old, adv, mask, loss_type=loss_type, loss_params=given)
        results.append((loss, torch.autograd.grad(loss, x)[0]))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert not (torch.equal(loss_a, loss_b) and torch.allclose(grad_a, grad_b, rtol=1e-12, atol=0))


def test_aliases_pick_their_objective_and_aggregation():
    logp, old, adv, mask, _ = _logp_inputs(4, 7)
    for alias, (name, agg) in objectives.ALIASES.items():
        got, _ = pf.policy_loss(logp, old, adv, mask, loss_type=alias)
        want, _ = pf.policy_loss(logp, old, adv, mask, loss_type=name,
                                 agg=agg or objectives.OBJECTIVES[name].agg)
        assert torch.equal(got, want), alias
    explicit, _ = pf.policy_loss(logp, old, adv, mask, loss_type="grpo", agg="token-sum")
    want, _ = pf.policy_loss(logp, old, adv, mask, agg="token-sum")
    assert torch.equal(explicit, want)


def test_the_loss_types_differ():
    logp, old, adv, mask, _ = _logp_inputs(6, 8)
    old = old + 0.4 * torch.randn_like(old)
    losses = {}
    for name, params in CASES:
        if params == OBJECTIVE_PARAMS[name][0]:
            losses[name] = pf.policy_loss(logp, old, adv, mask, loss_type=name, loss_params=params)[0].item()
    assert len(set(losses.values())) == len(losses), losses


def test_clip_cov_cuts_a_random_subset_drawn_from_the_global_generator():
    logp, old, adv, mask, _ = _logp_inputs(6, 20)
    params = {"clip_cov_ratio": 0.1, "clip_cov_lb": -10.0, "clip_cov_ub": 10.0}
    opts = R.LossOptions(loss_type="clip_cov", loss_params=params)
    torch.manual_seed(5)
    first = objectives.policy_terms(logp, old, adv, mask, opts)
    torch.manual_seed(5)
    again = objectives.policy_terms(logp, old, adv, mask, opts)
    other = objectives.policy_terms(logp, old, adv, mask, opts)
    assert torch.equal(first.clipped_lower, again.clipped_lower)
    assert not torch.equal(first.clipped_lower, other.clipped_lower)
    assert int(first.clipped_lower.sum()) == max(int(0.1 * int(mask.sum())), 1)
    assert (first.pg[first.clipped_lower] == 0).all()


def test_kl_cov_adds_the_kl_term_on_the_top_covariance_share():
    logp, old, adv, mask, _ = _logp_inputs(6, 20)
    opts = R.LossOptions(loss_type="kl_cov", loss_params={"kl_cov_ratio": 0.1, "kl_cov_coef": 2.0})
    terms = objectives.policy_terms(logp, old, adv, mask, opts)
    chosen = terms.clipped
    assert int(chosen.sum()) == int(0.1 * int(mask.sum()))
    cov = (adv - adv[mask].mean()) * (logp - logp[mask].mean())
    assert cov[chosen].min() >= cov[mask & ~chosen].max()
    base = -adv * (logp - old).exp()
    torch.testing.assert_close(terms.pg[chosen], (base + 2.0 * (logp - old).abs())[chosen])
    torch.testing.assert_close(terms.pg[mask & ~chosen], base[mask & ~chosen])


@pytest.mark.parametrize("loss_type", ["gspo", "sapo", "cispo", "geo_mean", "dppo_kl", "vespo", "kl_cov"])
def test_objectives_compile_in_one_graph(loss_type):
    logits, labels, old, adv, mask, ref, weights = _inputs(2, 5, 64, torch.float32, "cpu")

    def step(x):
        return pf.ppo_loss(x, labels, old.float(), adv.float(), mask, loss_type=loss_type, ref_logp=ref.float(),
                           kl_coef=0.1, rollout_is_weights=weights.float())[0]

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(logits), step(logits))
    torch.testing.assert_close(torch.autograd.grad(compiled(logits), logits)[0],
                               torch.autograd.grad(step(logits), logits)[0])


def test_module_takes_the_loss_type():
    logits, labels, old, adv, mask, ref, weights = _inputs(2, 5, 64, F64, "cpu")
    module = pf.PPOLoss(loss_type="sapo", loss_params={"tau_neg": 2.0})
    got, _ = module(logits, labels, old, adv, mask, rollout_is_weights=weights)
    want, _ = pf.ppo_loss(logits, labels, old, adv, mask, loss_type="sapo", loss_params={"tau_neg": 2.0},
                          rollout_is_weights=weights)
    assert torch.equal(got, want)
    assert "sapo" in repr(module)


def test_a_nan_at_a_valid_token_shows_in_the_loss_not_only_in_the_gradient():
    logp, old, adv, mask, _ = _logp_inputs(3, 5)
    logp = logp.clone()
    logp[0, 0] = float("nan")
    for loss_type in ("dppo_tv", "dppo_kl", "vanilla", "sapo"):
        x = logp.clone().requires_grad_()
        loss, _ = pf.policy_loss(x, old, adv, mask, loss_type=loss_type)
        assert torch.isnan(loss), loss_type


def test_geo_mean_ignores_a_zero_advantage_tokens_infinite_log_ratio():
    logp, old, adv, mask, _ = _logp_inputs(3, 5)
    old, adv = old.clone(), adv.clone()
    old[0, 0], adv[0] = -float("inf"), 0.0
    x = logp.clone().requires_grad_()
    loss, _ = pf.policy_loss(x, old, adv, mask, loss_type="geo_mean")
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    clean, _ = pf.policy_loss(logp, old.clamp(min=-50), adv, mask, loss_type="geo_mean")
    torch.testing.assert_close(loss.detach(), clean, rtol=1e-14, atol=0)


def test_numpy_scalars_are_numbers():
    logp, old, adv, mask, _ = _logp_inputs(2, 3)
    want, _ = pf.policy_loss(logp, old, adv, mask, clip_low=0.25, num_tokens=4)
    got, _ = pf.policy_loss(logp, old, adv, mask, clip_low=np.float64(0.25), num_tokens=np.int64(4))
    assert torch.equal(got, want)
    got, _ = pf.policy_loss(logp, old, adv, mask, loss_type="dro", loss_params={"beta": np.float64(0.3)})
    want, _ = pf.policy_loss(logp, old, adv, mask, loss_type="dro", loss_params={"beta": 0.3})
    assert torch.equal(got, want)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_type="ppo2"), "loss_type must be one of"),
    (dict(loss_type="sapo", loss_params={"tau": 1.0}), r"loss_params has \['tau'\].*tau_pos, tau_neg"),
    (dict(loss_type="dro"), r"needs loss_params \['beta'\]"),
    (dict(loss_type="dro", loss_params={"beta": -1.0}), r"loss_params\['beta'\] must be a finite number > 0"),
    (dict(loss_type="gspo", dual_clip=3.0), "dual_clip applies to loss_type='vanilla' only"),
    (dict(loss_type="sapo", clip_high=0.3), "does not clip"),
    (dict(loss_type="vanilla", loss_params={"importance_level": "seq"}), "importance_level"),
    (dict(loss_type="vanilla", loss_params={"max_log_ratio": 5.0}), "needs importance_level='sequence'"),
    (dict(loss_type="kl_cov", loss_params={"kl_cov_ratio": 2.0}), r"share of the tokens"),
    (dict(loss_type="cispo", loss_params={"ratio_max": float("inf")}), "ratio_max"),
    (dict(loss_type="vanilla", loss_params=[("x", 1)]), "loss_params must be a dict"),
    (dict(loss_type="gspo", loss_params={"importance_level": "token"}), "gspo' is the sequence ratio"),
    (dict(loss_type="gspo", loss_params={"max_log_ratio": -1.0}), r"max_log_ratio'\] must be a finite number > 0"),
    (dict(loss_type="clip_cov", loss_params={"clip_cov_lb": 5.0, "clip_cov_ub": 1.0}), "clip_cov_lb < clip_cov_ub"),
    (dict(loss_type="cispo", loss_params={"ratio_min": 2.0}), "must not exceed the upper"),
    (dict(loss_type="vanilla", loss_params={"token_gradient": 1}), r"token_gradient'\] must be a bool"),
    (dict(horizon=100.0), r"horizon is the divisor of agg='seq-mean-token-sum-norm' only, got agg='token-mean'"),
])
def test_bad_options_are_named(kwargs, match):
    logp, old, adv, mask, _ = _logp_inputs(2, 3)
    with pytest.raises(ValueError, match=match):
        pf.policy_loss(logp, old, adv, mask, **kwargs)
    with pytest.raises(ValueError, match=match):
        pf.PPOLoss(**kwargs)


def test_bad_weights_are_named():
    logp, old, adv, mask, weights = _logp_inputs(2, 3)
    negative = weights.clone()
    negative[0, 0] = -1.0
    with pytest.raises(ValueError, match="rollout_is_weights must be >= 0 at the masked-in tokens; found -1.0"):
        pf.policy_loss(logp, old, adv, mask, rollout_is_weights=negative)
    negative[0, 0] = 1.0
    negative[~mask] = -5.0  # what masked positions hold is not read
    pf.policy_loss(logp, old, adv, mask, rollout_is_weights=negative)
    with pytest.raises(ValueError, match=r"rollout_is_weights must have shape \(2, 3\)"):
        pf.policy_loss(logp, old, adv, mask, rollout_is_weights=weights[:, :2])
    with pytest.raises(ValueError, match="rollout_is_weights must be a floating-point tensor"):
        pf.policy_loss(logp, old, adv, mask, rollout_is_weights=mask.long())


def test_a_weight_at_an_ignored_label_is_not_read_like_a_masked_ones(backend, device):
    """pf.ppo_loss skips a token whose label is ignore_index as it skips a masked one: a negative
    weight there is no error, and the loss is the one with the token masked out."""
    lead, V = (2, 4), 7
    logits = random_logits((*lead, V), torch.float32, device)
    labels = random_labels(lead, V, device)
    old, adv = torch.randn(lead, device=device) - 2, torch.randn(lead, device=device)
    weights = torch.rand(lead, device=device) + 0.5
    weights[0, 3] = -1.0
    mask = torch.ones(lead, dtype=torch.bool, device=device)
    ignored = labels.clone()
    ignored[0, 3] = -100
    masked_out = mask.clone()
    masked_out[0, 3] = False
    loss, _ = pf.ppo_loss(logits, ignored, old, adv, mask, rollout_is_weights=weights)
    expected, _ = pf.ppo_loss(logits, labels, old, adv, masked_out, rollout_is_weights=weights)
    assert torch.equal(loss, expected)
    with pytest.raises(ValueError, match="rollout_is_weights must be >= 0 at the masked-in tokens"):
        pf.ppo_loss(logits, labels, old, adv, mask, rollout_is_weights=weights)
