"""Public API contract: bad input errors, dispatch, torch.compile, modules, controllers."""

import dataclasses
import inspect
import math
import re
import warnings

import pytest
import torch

import ppo_fast as pf
from ppo_fast import dispatch, native, spec
from ppo_fast.arguments import LossOptions



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
    a, ret = pf.gae(rewards, values, mask, gamma=1.0, lam=0.95, whiten=False)
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
    (lambda logits, y, lp, a, m: pf.policy_loss(lp, lp, a, m, clip_low=float("nan")), "clip_low must be"),
    (lambda logits, y, lp, a, m: pf.policy_loss(lp, lp, a, m, clip_low=-0.1), "clip_low must be"),
    (lambda logits, y, lp, a, m: pf.policy_loss(lp, lp, a, m, clip_high=-1e-3), "clip_high must be"),
    (lambda logits, y, lp, a, m: pf.policy_loss(lp, lp, a, m, dp_size=2), "needs num_tokens"),
    (lambda logits, y, lp, a, m: pf.policy_loss(lp, lp, a, m, dp_size=2, agg="seq-mean-token-mean",
                                                num_tokens=7), "needs num_seqs"),
    (lambda logits, y, lp, a, m: pf.policy_loss(lp, lp, a, m, dual_clip=1.0), "dual_clip must be a number > 1"),
    (lambda logits, y, lp, a, m: pf.policy_loss(lp, lp, a[:, :3], m), r"advantages must have shape \(2, 5\)"),
    (lambda logits, y, lp, a, m: pf.policy_loss(lp, lp, a, m, num_tokens=0), "num_tokens must be"),
    (lambda logits, y, lp, a, m: pf.policy_loss(lp, lp, a, m, dp_size=0), "dp_size must be"),
    (lambda logits, y, lp, a, m: pf.kl_penalty(lp, lp, "k4"), "^estimator must be one of"),
    (lambda logits, y, lp, a, m: pf.ppo_loss(logits, y, lp, a, m, kl_estimator="kl2"), "kl_estimator must be one of"),
    (lambda logits, y, lp, a, m: pf.ppo_loss(logits, y, lp, a, m, ref_logp=lp[0]), r"ref_logp must have shape"),
    (lambda logits, y, lp, a, m: pf.ppo_loss(logits, y, lp.long(), a, m), "old_logp must be a floating-point"),
    (lambda logits, y, lp, a, m: pf.value_loss(lp, lp, a, m, clip=0), "clip must be"),
    (lambda logits, y, lp, a, m: pf.gae(lp, a[:, :2], m, whiten=False), r"values must have shape \(2, 5\)"),
    (lambda logits, y, lp, a, m: pf.gae(lp, a, m, gamma=1.5, whiten=False), r"gamma must be a number in \[0, 1\]"),
    (lambda logits, y, lp, a, m: pf.gae(lp[0], a[0], m[0], whiten=False), r"rewards must be \[B, T\]"),
    (lambda logits, y, lp, a, m: pf.gae(lp.flatten(), a.flatten(), m.flatten(),
                                   cu_seqlens=torch.tensor([0, 4, 9]), whiten=False), "cu_seqlens must rise from 0"),
    (lambda logits, y, lp, a, m: pf.masked_whiten(lp, torch.zeros_like(m)), "at least 2 tokens"),
    (lambda logits, y, lp, a, m: pf.group_advantages(lp, torch.zeros(2, 5).long()), "scores must be 1-D"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(*_batch())


def test_non_tensor_argument_is_a_type_error():
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        pf.token_logprobs([[0.0, 1.0]], torch.tensor([1]))


# Whether this run has the native CPU kernels: CI builds them (test_native.py fails if it cannot);
# the GPU suite switches them off (PPO_FAST_NATIVE=0).
NATIVE = native.unavailable() is None


def test_default_backends(monkeypatch):
    monkeypatch.delenv("PPO_FAST_BACKEND", raising=False)
    for op in dispatch.TABLE:
        has_native = NATIVE and "native" in dispatch.TABLE[op]
        assert dispatch.choose(op, "cpu") == ("native" if has_native else "reference"), op
        expected = "triton" if "triton" in dispatch.TABLE[op] else "reference"
        assert dispatch.choose(op, "cuda") == expected, op


def test_forced_backend_that_cannot_serve_lists_every_reason(monkeypatch):
    monkeypatch.setenv("PPO_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(pf.BackendUnavailable) as info:
        pf.token_logprobs(torch.randn(2, 3), torch.tensor([0, 1]))
    message = str(info.value)
    assert "PPO_FAST_BACKEND=triton cannot run token_logprobs on cpu tensors" in message
    assert "TRITON_INTERPRET is not 1" in message
    assert "reference: available" in message and ("native: available" in message or not NATIVE)
    with pytest.raises(pf.BackendUnavailable, match="cannot run gae"):
        pf.gae(torch.randn(2, 3), torch.randn(2, 3), whiten=False)


def test_functions_outside_the_table_run_their_spec_whatever_the_forced_backend(monkeypatch):
    monkeypatch.setenv("PPO_FAST_BACKEND", "native")
    logp = torch.randn(2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(pf.kl_penalty(logp, logp - 1), spec.kl_penalty(logp, logp - 1))
        pf.masked_mean(torch.randn(2, 3), torch.ones(2, 3))
    assert "kl_penalty" not in dispatch.TABLE and "masked_mean" not in dispatch.TABLE


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("PPO_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="PPO_FAST_BACKEND must be one of"):
        pf.token_logprobs(torch.randn(2, 3), torch.tensor([0, 1]))


PUBLIC_CALLS = {
    "token_logprobs": lambda b: pf.token_logprobs(b["logits"], b["labels"]),
    "ppo_loss": lambda b: pf.ppo_loss(b["logits"], b["labels"], b["old"], b["adv"], b["mask"]),
    "linear_logprobs": lambda b: pf.fused_linear_ppo_loss(
        b["logits"], b["logits"].detach().reshape(-1, 11)[:7], b["labels"] % 7, b["old"], b["adv"], b["mask"]),
    "gae": lambda b: pf.gae(b["old"], b["adv"], b["mask"], whiten=False),
    "full_kl": lambda b: pf.ppo_loss(b["logits"], b["labels"], b["old"], b["adv"], b["mask"], kl_estimator="full",
                                     ref_logits=b["logits"].detach() * 0.5, kl_coef=0.1),
    "policy_loss": lambda b: pf.policy_loss(b["old"], b["old"], b["adv"], b["mask"]),
    "value_loss": lambda b: pf.value_loss(b["old"], b["old"], b["adv"], b["mask"]),
    "kl_penalty": lambda b: pf.kl_penalty(b["old"], b["adv"]),
    "masked_whiten": lambda b: pf.masked_whiten(b["old"], b["mask"]),
    "masked_mean": lambda b: pf.masked_mean(b["old"], b["mask"]),
    "group_advantages": lambda b: pf.group_advantages(b["old"][:, 0], torch.tensor([0, 0])),
    "advantages": lambda b: pf.advantages("gae", b["adv"], b["old"], b["mask"], whiten=False),
    "rollout_correction": lambda b: pf.rollout_correction(b["old"], b["old"] - 0.1, b["mask"]),
}


def _named_batch():
    logits, labels, old, adv, mask = _batch()
    return dict(logits=logits, labels=labels, old=old, adv=adv, mask=mask)


def test_every_op_of_the_table_chooses_its_backend_there(monkeypatch):
    assert set(dispatch.TABLE) == {"token_logprobs", "ppo_loss", "linear_logprobs", "gae", "full_kl"}
    assert set(dispatch.TABLE) < set(PUBLIC_CALLS)
    chosen = []
    original = dispatch.choose

    def spy(op, device):
        chosen.append(op)
        return original(op, device)

    monkeypatch.setattr(dispatch, "choose", spy)
    batch = _named_batch()
    for op in dispatch.TABLE:
        chosen.clear()
        PUBLIC_CALLS[op](batch)
        assert op in chosen, f"pf.{op} did not choose its backend from the table (it chose {chosen})"


@pytest.mark.parametrize("op", list(PUBLIC_CALLS))
def test_every_public_op_compiles_in_one_graph(op):
    """fullgraph=True: a graph break (a call falling back to eager) is an error."""
    batch = _named_batch()
    call = PUBLIC_CALLS[op]
    torch._dynamo.reset()
    compiled = torch.compile(lambda: call(batch), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(), call(batch))


def test_compiled_ppo_loss_gives_the_eager_gradient():
    batch = _named_batch()

    def step(x):
        loss, _ = pf.ppo_loss(x, batch["labels"], batch["old"], batch["adv"], batch["mask"],
                              ref_logp=batch["old"] - 0.3, kl_coef=0.1, entropy_coef=0.01)
        return loss

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    logits = batch["logits"]
    torch.testing.assert_close(torch.autograd.grad(compiled(logits), logits)[0],
                               torch.autograd.grad(step(logits), logits)[0])


def test_public_defaults_are_the_loss_options_defaults():
    defaults = {f.name: f.default for f in dataclasses.fields(LossOptions)}
    for fn in (pf.policy_loss, pf.ppo_loss, pf.value_loss):
        for name, param in inspect.signature(fn).parameters.items():
            if name in defaults:
                assert param.default == defaults[name], f"{fn.__name__}({name}=...)"


def test_ppo_loss_module_checks_its_options_at_construction():
    with pytest.raises(ValueError, match="clip_low must be"):
        pf.PPOLoss(clip_low=-2.0)
    with pytest.raises(TypeError, match="clip_lo"):
        pf.PPOLoss(clip_lo=0.2)


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


def test_adaptive_kl_controller_with_proportional_action_and_hold_until_target():
    ctl = pf.AdaptiveKLController(0.1, target=10.0, horizon=32, proportional=1.0, hold_until_target=True)
    ctl.update(current_kl=0.0, n_steps=32)  # below target, never reached: the integral holds
    assert ctl.integral == 0.1 and ctl.value == pytest.approx(0.1 * math.exp(-1.0))
    ctl.update(current_kl=4.0, n_steps=32)
    assert ctl.integral == 0.1 and ctl.value == pytest.approx(0.1 * math.exp(-0.6))
    ctl.update(current_kl=15.0, n_steps=32)  # reached: integral +20% (clipped), proportional e^0.5
    assert ctl.integral == pytest.approx(0.12) and ctl.value == pytest.approx(0.12 * math.exp(0.5))
    ctl.update(current_kl=35.0, n_steps=16)  # the proportional error is clipped to 1
    assert ctl.integral == pytest.approx(0.12 * 1.1) and ctl.value == pytest.approx(0.132 * math.e)
    ctl.update(current_kl=9.0, n_steps=32)  # below target again: after reaching it, the integral moves
    assert ctl.integral == pytest.approx(0.132 * 0.9) and ctl.value == pytest.approx(0.132 * 0.9 * math.exp(-0.1))
    clone = pf.AdaptiveKLController(1.0, 1.0, 1.0)
    clone.load_state_dict(ctl.state_dict())
    assert clone.state_dict() == ctl.state_dict()
    assert clone.update(10.0, 32) == ctl.update(10.0, 32)
    # A state saved before these options existed resumes as the plain controller it was.
    old = pf.AdaptiveKLController(1.0, 1.0, 1.0)
    old.load_state_dict({"value": 0.3, "target": 6.0, "horizon": 100.0})
    assert old.update(6.0, 10) == 0.3 and old.proportional == 0.0
    with pytest.raises(ValueError, match="proportional must be a finite number >= 0, got -1"):
        pf.AdaptiveKLController(0.1, target=1, horizon=1, proportional=-1)


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


def test_triton_path_serves_the_public_contract(device, force_backend):
    logits, labels, old, adv, mask = (t.to(device) for t in _batch(v=300))
    logits = logits.detach().requires_grad_()
    with force_backend("triton"):
        loss, metrics = pf.ppo_loss(logits, labels, old, adv, mask, ref_logp=old, kl_coef=0.1)
        loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_cli_backends_prints_the_op_table(capsys):
    from ppo_fast.cli import main

    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    for op in dispatch.TABLE:
        assert op in out
    cpu = out.split("\n\n")[1]
    for op in ("token_logprobs", "ppo_loss", "linear_logprobs", "gae", "full_kl"):
        # The CPU default: native (the last column) where built, else the reference (the first).
        assert re.search(rf"^  {op} .* yes \*$" if NATIVE else rf"^  {op} +yes \* ", cpu, re.M), op
    assert re.search(r"^Every other function \(policy_loss, value_loss, .*\) runs its PyTorch spec", out, re.M)


@pytest.mark.parametrize("op", ["token_logprobs", "token_logprobs_backward", "ppo_loss_tokens", "gae", "full_kl",
                                "full_kl_backward"])
def test_library_ops_have_one_kernel_per_device(op):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ppo_fast::{op}", key), key


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_both_backends_reach_the_one_reduction(backend, force_backend, monkeypatch):
    from ppo_fast import spec as reference

    calls = []
    original = reference.reduce

    def counted(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(reference, "reduce", counted)
    logits, labels, old, adv, mask = _batch()
    with force_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # policy_loss has no Triton kernel
        pf.ppo_loss(logits, labels, old, adv, mask)
        pf.policy_loss(old, old, adv, mask)
    assert len(calls) == 2 and all(isinstance(t, reference.TokenTerms) for t in calls)


def test_compiled_loss_keeps_working_when_an_option_changes_between_calls():
    """torch.compile turns a float that changes between calls into a symbolic value; the option
    checks must accept it (an adaptive KL controller changes kl_coef every step)."""
    batch = _named_batch()
    module = pf.PPOLoss(clip_low=0.2)
    compiled_fn = torch.compile(pf.ppo_loss, backend="aot_eager", fullgraph=True)
    compiled_module = torch.compile(module, backend="aot_eager", fullgraph=True)
    args = (batch["logits"], batch["labels"], batch["old"], batch["adv"], batch["mask"])
    torch._dynamo.reset()
    for kl_coef, temperature in ((0.1, 1.0), (0.2, 0.9), (0.3, 0.8)):
        kw = dict(ref_logp=batch["old"] - 0.2, kl_coef=kl_coef, temperature=temperature)
        torch.testing.assert_close(compiled_fn(*args, **kw)[0], pf.ppo_loss(*args, **kw)[0])
        module.kl_coef = kl_coef
        torch.testing.assert_close(compiled_module(*args, ref_logp=batch["old"])[0],
                                   pf.ppo_loss(*args, ref_logp=batch["old"], kl_coef=kl_coef)[0])


def test_ppo_loss_module_override_of_clip_low_moves_an_unset_clip_high():
    logits, labels, old, adv, mask = _batch()
    old = pf.token_logprobs(logits, labels).detach() + 0.1 * torch.randn_like(old)
    got, got_metrics = pf.PPOLoss(clip_low=0.2)(logits, labels, old, adv, mask, clip_low=0.05)
    want, want_metrics = pf.ppo_loss(logits, labels, old, adv, mask, clip_low=0.05)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_metrics["clipfrac"], want_metrics["clipfrac"])


@pytest.mark.parametrize("call, error, match", [
    (lambda: pf.token_logprobs(torch.randn(2, 3), torch.tensor([0, 1]), ignore_index=1.5),
     ValueError, "ignore_index must be an int"),
    (lambda: pf.token_logprobs(torch.randn(2, 3), torch.tensor([0, 1]), ignore_index=None),
     ValueError, "ignore_index must be an int"),
    (lambda: pf.token_logprobs(torch.randn(2, 3), torch.tensor([0, 1]), ignore_index=2**70),
     ValueError, "ignore_index must be an int in"),
    (lambda: pf.ppo_loss(*_batch(), kl_coef=0.5), ValueError, "kl_coef=0.5 needs ref_logp"),
    (lambda: pf.ppo_loss(*_batch(), kl_estimator=["k3"]), ValueError, "kl_estimator must be one of"),
    (lambda: pf.PPOLoss(clip=0.2), TypeError, r"PPOLoss got unexpected keyword arguments \['clip'\]"),
    (lambda: pf.ValueLoss(clip=-1), ValueError, "clip must be a finite number > 0"),
    (lambda: pf.kl_penalty(torch.randn(3), torch.randn(3, device="meta")), ValueError, "ref_logp is on meta"),
    (lambda: pf.masked_mean(torch.randn(3), torch.ones(3, device="meta")), ValueError, "mask is on meta"),
    (lambda: pf.masked_whiten(torch.randn(3), torch.ones(3, device="meta")), ValueError, "mask is on meta"),
    (lambda: pf.group_advantages(torch.randn(3), torch.zeros(3, dtype=torch.long, device="meta")),
     ValueError, "group_ids is on meta"),
    (lambda: pf.group_advantages(torch.randn(2), torch.zeros(2, dtype=torch.long),
                                 torch.ones(2, 3, dtype=torch.complex64)), ValueError, "mask must be bool"),
])
def test_bad_arguments_found_by_probing(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_small_integer_labels_keep_ignore_index_meaning():
    """-100 in a uint8 tensor would be 156: labels are compared as int64."""
    logits = torch.randn(3, 200)
    labels = torch.tensor([156, 3, 7], dtype=torch.uint8)
    lp = pf.token_logprobs(logits, labels)
    torch.testing.assert_close(lp, pf.token_logprobs(logits, labels.long()))
    assert lp[0] != 0


def test_meta_tensors_give_shapes_not_errors():
    logits, labels = torch.randn(2, 3, 11, device="meta"), torch.zeros(2, 3, dtype=torch.long, device="meta")
    assert pf.token_logprobs(logits, labels).shape == (2, 3)
    values = torch.randn(2, 3, device="meta")
    assert pf.masked_whiten(values, torch.ones(2, 3, device="meta")).shape == (2, 3)


def test_policy_loss_is_differentiable_in_logp_only():
    logp = torch.randn(2, 5, requires_grad=True)
    old, adv = torch.randn(2, 5, requires_grad=True), torch.randn(2, 5, requires_grad=True)
    loss, _ = pf.policy_loss(logp, old, adv, torch.ones(2, 5, dtype=torch.bool))
    loss.backward()
    assert logp.grad is not None and old.grad is None and adv.grad is None


def test_cli_backends_with_an_unknown_backend_is_one_line(monkeypatch, capsys):
    from ppo_fast.cli import main

    monkeypatch.setenv("PPO_FAST_BACKEND", "bogus")
    assert main(["backends"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ppo-fast: PPO_FAST_BACKEND must be one of") and "Traceback" not in err


@pytest.mark.parametrize("call", ["token_logprobs", "ppo_loss"])
def test_a_second_backward_through_a_kernels_gradient_is_an_error_not_a_zero(backend, call):
    """create_graph=True gives the kernels' gradient, which a second backward (a gradient penalty)
    refuses by name: autograd would take it as a constant and add 0."""
    logits, labels, old, adv, mask = _batch()
    x = logits.detach().double().requires_grad_()

    def value():
        if call == "token_logprobs":
            return (pf.token_logprobs(x, labels, temperature=0.8) * adv.double()).sum()
        return pf.ppo_loss(x, labels, old.double(), adv.double(), mask, ref_logp=old.double(), kl_coef=0.1,
                           entropy_coef=0.01)[0]

    (with_graph,) = torch.autograd.grad(value(), x, create_graph=True)
    (plain,) = torch.autograd.grad(value(), x)
    torch.testing.assert_close(with_graph, plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=f"pf.{call}'s gradient comes from its kernels and cannot be "
                                           "differentiated twice"):
        torch.autograd.grad(with_graph.square().sum(), x)
