"""Public API contract: bad input errors, backend selection, modules, controllers."""

import pytest
import torch

import ppo_fast as pf
from ppo_fast import backend as B

from helpers import backend


def _batch(b=2, t=5, v=11):
    logits = torch.randn(b, t, v, requires_grad=True)
    labels = torch.randint(0, v, (b, t))
    lp = torch.randn(b, t)
    return logits, labels, lp, torch.randn(b, t), torch.ones(b, t, dtype=torch.bool)


def test_readme_contract_runs_on_cpu():
    logits, labels, old, adv, mask = _batch()
    logp = pf.token_logprobs(logits, labels)
    logp, ent = pf.token_logprobs(logits, labels, return_entropy=True, temperature=0.7)
    rewards, values = torch.randn(2, 5), torch.randn(2, 5)
    a, ret = pf.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    a = pf.masked_whiten(a, mask)
    kl = pf.kl_penalty(logp, old, estimator="k3")
    loss, metrics = pf.policy_loss(logp, old, a, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                                   agg="token-mean")
    vloss, vmetrics = pf.value_loss(values, values + 0.1, ret, mask, clip=0.2)
    loss, metrics = pf.ppo_loss(logits, labels, old, a, mask, ref_logp=old, kl_coef=0.05,
                                kl_estimator="k3", entropy_coef=0.01)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert {"clipfrac", "clipfrac_lower", "approx_kl", "ratio_mean", "ratio_max", "entropy", "kl"} <= set(metrics)
    assert kl.shape == logp.shape and "vf_clipfrac" in vmetrics and vloss.ndim == 0


@pytest.mark.parametrize("call, match", [
    (lambda logits, y, lp, a, m: pf.token_logprobs(logits, y[:, :-1]), r"labels must have shape \(2, 5\)"),
    (lambda logits, y, lp, a, m: pf.token_logprobs(logits, y.float()), "labels must be an integer tensor"),
    (lambda logits, y, lp, a, m: pf.token_logprobs(logits.long(), y), "logits must be a floating-point tensor"),
    (lambda logits, y, lp, a, m: pf.token_logprobs(logits, y + 11), r"labels must lie in \[0, 11\)"),
    (lambda logits, y, lp, a, m: pf.token_logprobs(logits, y - 50), r"labels must lie in \[0, 11\).*found -"),
    (lambda logits, y, lp, a, m: pf.token_logprobs(logits, y, temperature=0), "temperature must be"),
    (lambda logits, y, lp, a, m: pf.policy_loss(lp, lp, a, m, agg="mean"), "agg must be one of"),
    (lambda logits, y, lp, a, m: pf.policy_loss(lp, lp, a, m, clip_low=0), "clip_low must be"),
    (lambda logits, y, lp, a, m: pf.policy_loss(lp, lp, a, m, clip_low=-0.1), "clip_low must be"),
    (lambda logits, y, lp, a, m: pf.policy_loss(lp, lp, a, m, clip_high=0.0), "clip_high must be"),
    (lambda logits, y, lp, a, m: pf.policy_loss(lp, lp, a, m, dual_clip=1.0), "dual_clip must be a number > 1"),
    (lambda logits, y, lp, a, m: pf.policy_loss(lp, lp, a[:, :3], m), r"advantages must have shape \(2, 5\)"),
    (lambda logits, y, lp, a, m: pf.policy_loss(lp, lp, a, m, num_tokens=0), "num_tokens must be"),
    (lambda logits, y, lp, a, m: pf.policy_loss(lp, lp, a, m, dp_size=0), "dp_size must be"),
    (lambda logits, y, lp, a, m: pf.kl_penalty(lp, lp, "k4"), "kl_estimator must be one of"),
    (lambda logits, y, lp, a, m: pf.ppo_loss(logits, y, lp, a, m, kl_estimator="kl2"), "kl_estimator must be one of"),
    (lambda logits, y, lp, a, m: pf.ppo_loss(logits, y, lp, a, m, ref_logp=lp[0]), r"ref_logp must have shape"),
    (lambda logits, y, lp, a, m: pf.ppo_loss(logits, y, lp.long(), a, m), "old_logp must be a floating-point"),
    (lambda logits, y, lp, a, m: pf.value_loss(lp, lp, a, m, clip=0), "clip must be"),
    (lambda logits, y, lp, a, m: pf.gae(lp, a[:, :2], m), r"values must have shape \(2, 5\)"),
    (lambda logits, y, lp, a, m: pf.gae(lp, a, m, gamma=1.5), r"gamma must be a number in \[0, 1\]"),
    (lambda logits, y, lp, a, m: pf.gae(lp[0], a[0], m[0]), r"rewards must be \[B, T\]"),
    (lambda logits, y, lp, a, m: pf.gae(lp.flatten(), a.flatten(), m.flatten(),
                                   cu_seqlens=torch.tensor([0, 4, 9])), "cu_seqlens must rise from 0"),
    (lambda logits, y, lp, a, m: pf.masked_whiten(lp, torch.zeros_like(m)), "at least 2 tokens"),
    (lambda logits, y, lp, a, m: pf.group_advantages(lp, torch.zeros(2, 5).long()), "scores must be 1-D"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(*_batch())


def test_non_tensor_argument_is_a_type_error():
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        pf.token_logprobs([[0.0, 1.0]], torch.tensor([1]))


def test_cpu_default_backend_is_reference(monkeypatch):
    monkeypatch.delenv("PPO_FAST_BACKEND", raising=False)
    assert B.select("token_logprobs", torch.device("cpu")) == "reference"


def test_forced_backend_that_cannot_serve_lists_every_reason(monkeypatch):
    monkeypatch.setenv("PPO_FAST_BACKEND", "native")
    with pytest.raises(pf.BackendUnavailable) as info:
        pf.token_logprobs(torch.randn(2, 3), torch.tensor([0, 1]))
    message = str(info.value)
    assert "PPO_FAST_BACKEND=native cannot run token_logprobs" in message
    assert "reference: available" in message and "triton:" in message and "native:" in message


def test_forced_triton_without_interpreter_on_cpu_says_why(monkeypatch):
    monkeypatch.setenv("PPO_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(pf.BackendUnavailable, match="TRITON_INTERPRET is not 1"):
        pf.gae(torch.randn(2, 3), torch.randn(2, 3))


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("PPO_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="PPO_FAST_BACKEND must be one of"):
        pf.token_logprobs(torch.randn(2, 3), torch.tensor([0, 1]))


def test_ppo_loss_module_matches_function_and_follows_kl_coef():
    logits, labels, old, adv, mask = _batch()
    module = pf.PPOLoss(clip_low=0.2, clip_high=0.28, kl_coef=0.1, entropy_coef=0.01)
    loss_m, _ = module(logits, labels, old, adv, mask, ref_logp=old - 0.5)
    loss_f, _ = pf.ppo_loss(logits, labels, old, adv, mask, ref_logp=old - 0.5, clip_low=0.2,
                            clip_high=0.28, kl_coef=0.1, entropy_coef=0.01)
    torch.testing.assert_close(loss_m, loss_f)
    module.kl_coef = 0.0
    loss_0, _ = module(logits, labels, old, adv, mask, ref_logp=old - 0.5)
    assert not torch.allclose(loss_0, loss_m)
    assert "kl_coef=0.0" in repr(module)


def test_value_loss_module():
    v, old, ret = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.ones(3, 4)
    loss_m, metrics = pf.ValueLoss(clip=0.3)(v, old, ret, mask)
    torch.testing.assert_close(loss_m, pf.value_loss(v, old, ret, mask, clip=0.3)[0])
    assert set(metrics) == {"vf_loss", "vf_clipfrac"}


def test_adaptive_kl_controller_follows_ziegler_update():
    ctl = pf.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=256)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    ctl.update(current_kl=5.7, n_steps=256)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000) * (1 - 0.05 * 256 / 10000))
    clone = pf.AdaptiveKLController(1.0, 1.0, 1.0)
    clone.load_state_dict(ctl.state_dict())
    assert clone.state_dict() == ctl.state_dict()
    with pytest.raises(ValueError, match="current_kl must be finite"):
        ctl.update(float("nan"), 1)
    with pytest.raises(ValueError, match="target must be"):
        pf.AdaptiveKLController(0.1, target=0, horizon=1)


def test_fixed_kl_controller():
    ctl = pf.FixedKLController(0.05)
    assert ctl.update(100.0, 10) == 0.05


def test_group_advantages_broadcasts_over_tokens():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]])
    adv = pf.group_advantages(scores, torch.tensor([0, 0, 1, 1]), mask)
    assert adv.shape == (4, 3)
    assert (adv[mask == 0] == 0).all()
    assert adv[0, 0] < 0 < adv[1, 0]


def test_masked_mean_of_empty_mask_is_zero():
    assert pf.masked_mean(torch.randn(3), torch.zeros(3)).item() == 0


def test_ppo_metrics_are_detached_scalars():
    logits, labels, old, adv, mask = _batch()
    _, metrics = pf.ppo_loss(logits, labels, old, adv, mask, ref_logp=old, kl_coef=0.1)
    for name, value in metrics.items():
        assert value.ndim == 0 and not value.requires_grad, name


def test_triton_path_serves_public_contract_under_interpreter():
    logits, labels, old, adv, mask = _batch(v=300)
    with backend("triton"):
        loss, metrics = pf.ppo_loss(logits, labels, old, adv, mask, ref_logp=old, kl_coef=0.1)
        loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_cli_demo_runs_and_improves_the_score(capsys):
    from ppo_fast.cli import main

    assert main(["demo", "--iterations", "8", "--batch-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "score" in out and "->" in out


def test_cli_backends_lists_reasons(capsys):
    from ppo_fast.cli import main

    assert main(["backends"]) == 0
    assert "native" in capsys.readouterr().out
