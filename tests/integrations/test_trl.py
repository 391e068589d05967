"""ppo_fast.integrations.trl against TRL 1.16's own ``GRPOTrainer``.

(a) The loss formula: ``_compute_loss`` of both trainers on the same hand-built batch, with the
    same float64 log-probs and entropies fed to both (their log-prob function replaced): loss,
    gradients with respect to the log-probs and the entropies, every metric, 1e-9; every
    loss_type × importance_sampling_level × option.
(b) End to end: two optimizer steps of a tiny Llama, TRL's trainer against ours, same seed and
    batch, per loss_type: losses, parameter gradients and logged metrics. There TRL's log-probs
    come from its fused LM head and ours from our kernel, both float32 with different summation
    orders (~1e-7 apart), so the tolerance is float32's: 1e-5 relative on losses, 3e-5 of each
    gradient's largest entry (the second step's gradients also carry the first step's float32
    differences, multiplied by the learning rate of 10; measured: ≤ 3e-6 for both).
(c) Our log-probs are our op's: a spy on ``ppo_fast.functional.token_logprobs`` and the
    ``torch.library`` op sees every call, TRL's fused head is never called, and the values equal
    a plain ``log_softmax`` of the model's logits.
(d) ``ppo_fast_head="fused"``: inside TRL's own fused LM head call, our fused linear head stands in
    for TRL's chunked function: the same log-probs, entropies and gradients as TRL's, and the
    same two training steps.
"""

import itertools
import math

import pytest
import torch
import trl
import trl.trainer.utils as trl_utils
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
    TrainerCallback,
)

from ppo_fast import dispatch, functional
from ppo_fast.ops import token_logprobs as token_logprobs_module
from ppo_fast.ops.token_logprobs import token_logprobs_op
from ppo_fast.integrations import trl as ours

D = torch.float64
EOS = 2


# --------------------------------------------------------------------------------------------
# A tiny Llama and its tokenizer, saved where TRL can load them (and the reference model) from
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


PROMPTS = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10 w11"]})


def reward(prompts, completions, completion_ids, **kwargs):
    # Varies within each group with the length and the tokens drawn.
    return [float(len(ids) % 5) + 0.3 * sum(1 for t in ids if t % 3 == 0) for ids in completion_ids]


def make_trainer(cls, model_dir, tmp_path, **config):
    settings = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none",
                    save_strategy="no", activation_checkpointing=False, per_device_train_batch_size=4,
                    num_generations=4, max_completion_length=8, seed=0, dataloader_num_workers=0)
    callbacks = config.pop("callbacks", None)
    settings.update(config)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    return cls(model=model_dir, reward_funcs=reward, args=trl.GRPOConfig(**settings), train_dataset=PROMPTS,
               processing_class=tokenizer, callbacks=callbacks)


@pytest.fixture(scope="module")
def pair(model_dir, tmp_path_factory):
    """A TRL trainer and ours, built alike, for the formula tests."""
    tmp = tmp_path_factory.mktemp("pair")
    return make_trainer(trl.GRPOTrainer, model_dir, tmp), make_trainer(ours.GRPOTrainer, model_dir, tmp)


# --------------------------------------------------------------------------------------------
# (a) The formula, float64, 1e-9
# --------------------------------------------------------------------------------------------

B, T = 6, 7
LENGTHS = [7, 3, 5, 1, 6, 0]


def formula_batch(seed, opts):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        mask[row, :n] = 1
    logp = -torch.rand(B, T, generator=g, dtype=D) * 3
    # Per-row shifts so that token and sequence ratios leave the clip range whatever the seed:
    # row 1 (A < 0) beyond delta, row 0 (A > 0) above the range, row 3 (A < 0) below it.
    shift = torch.tensor([[-0.5], [-1.0], [0.1], [0.5], [0.2], [0.0]], dtype=D)
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=D) + shift
    entropy = torch.rand(B, T, generator=g, dtype=D) * 4
    if opts.get("token_advantages"):
        advantages = torch.randn(B, T, generator=g, dtype=D)
        advantages[1] = 0.0
    else:
        advantages = torch.tensor([1.3, -0.7, 0.0, -1.5, 0.9, 0.4], dtype=D)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "num_items_in_batch": torch.tensor(int(mask.sum()) * 2),
              "old_per_token_logps": old,
              "ref_per_token_logps": logp + 0.3 * torch.randn(B, T, generator=g, dtype=D)}
    if opts.get("no_old"):
        del inputs["old_per_token_logps"]
    if opts.get("sampling"):
        sampling = old + 0.5 * torch.randn(B, T, generator=g, dtype=D)
        sampling[0, 2] = math.nan  # a token vLLM could not score
        inputs["sampling_per_token_logps"] = sampling
    if opts.get("tool_mask"):
        tool = torch.ones(B, T, dtype=torch.long)
        tool[0, 1:3] = 0
        tool[4, 5] = 0
        inputs["tool_mask"] = tool
    if opts.get("vllm") == "token":
        ratio = torch.rand(B, T, generator=g, dtype=D) * 2
        ratio[0, 4] = 0.0  # masked out by token_mask
        # 1 wherever TRL's mask (completion times tool mask) is 0, as TRL computes it.
        valid = (mask * inputs.get("tool_mask", 1)).bool()
        inputs["importance_sampling_ratio"] = torch.where(valid, ratio, 1.0)
    elif opts.get("vllm") == "sequence":
        inputs["importance_sampling_ratio"] = torch.rand(B, 1, generator=g, dtype=D) * 2
    return inputs, logp, entropy


OPTIONS = {
    "plain": {},
    "kl": {"beta": 0.04},
    "kl_no_bias_correction": {"beta": 0.04, "use_bias_correction_kl": False},
    "epsilon_high": {"epsilon_high": 0.28},
    "delta": {"delta": 1.5},
    "top_entropy": {"top_entropy_quantile": 0.3},
    "opsm": {"off_policy_mask_threshold": 0.05},
    "opsm_sampling": {"off_policy_mask_threshold": 0.05, "sampling": True},
    "entropy_bonus": {"entropy_coef": 0.01},
    "entropy_bonus_top": {"entropy_coef": 0.01, "top_entropy_quantile": 0.5},
    "adaptive_on": {"use_adaptive_entropy": True, "entropy_coef": 0.02, "last_world_entropy": 0.1},
    "adaptive_off": {"use_adaptive_entropy": True, "entropy_coef": 0.02},
    "vllm_token": {"vllm": "token"},
    "vllm_sequence": {"vllm": "sequence"},
    "no_old": {"no_old": True},
    "eval": {"eval": True},
    "accumulation": {"accumulation": (1, 3)},
    "tool_mask": {"tool_mask": True},
    "token_advantages": {"token_advantages": True},
    "moe_aux_loss": {"moe_aux_loss": True},
    "params": {"sapo_temperature_pos": 1.3, "sapo_temperature_neg": 0.7, "vespo_k_pos": 1.5,
               "vespo_lambda_pos": 2.5, "vespo_k_neg": 2.2, "vespo_lambda_neg": 1.1, "epsilon_high": 5.0},
    "everything": {"beta": 0.04, "epsilon_high": 0.28, "delta": 1.5, "top_entropy_quantile": 0.6,
                   "off_policy_mask_threshold": 0.05, "sampling": True, "entropy_coef": 0.01, "vllm": "token",
                   "tool_mask": True, "accumulation": (3, 2), "moe_aux_loss": True},
}
ARGS_FIELDS = ("delta", "use_bias_correction_kl", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
               "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "steps_per_generation")
INERT = {  # (option, loss types it cannot change)
    "delta": ("cispo", "sapo", "vespo"), "epsilon_high": ("sapo", "vespo"), "adaptive_off": ours.LOSS_TYPES,
    "vllm_sequence": ("vespo",), "no_old": ("cispo",),  # TRL's default cap 0.2 binds with or without
    "params": ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"),
}


def configure(trainer, loss_type, level, opts):
    """Set ``trainer`` as a GRPOConfig with these options would (attribute by attribute, as
    ``GRPOTrainer.__init__`` reads them)."""
    args = trainer.args
    for name in ARGS_FIELDS:  # (a GRPOConfig built here would reset the trainers' accelerator state)
        setattr(args, name, opts.get(name, trl.GRPOConfig.__dataclass_fields__[name].default))
    args.use_bias_correction_kl = opts.get("use_bias_correction_kl", True)
    trainer.loss_type, trainer.importance_sampling_level = loss_type, level
    trainer.epsilon_low, trainer.epsilon_high = 0.2, opts.get("epsilon_high", 0.2)
    trainer.beta = opts.get("beta", 0.0)
    trainer.top_entropy_quantile = opts.get("top_entropy_quantile", 1.0)
    trainer.off_policy_mask_threshold = opts.get("off_policy_mask_threshold")
    trainer.entropy_coef = opts.get("entropy_coef", 0.0)
    trainer.use_adaptive_entropy = opts.get("use_adaptive_entropy", False)
    trainer._entropy_bonus_enabled = trainer.entropy_coef != 0.0 or trainer.use_adaptive_entropy
    trainer._last_world_entropy = opts.get("last_world_entropy", math.inf)
    trainer._entropy_window_stats = None
    trainer.use_vllm = "vllm" in opts
    trainer.vllm_importance_sampling_correction = True
    trainer.vllm_importance_sampling_mode = "token_mask" if opts.get("vllm") == "token" else "sequence_mask"
    accumulation, steps_per_generation = opts.get("accumulation", (2, 4))
    trainer.current_gradient_accumulation_steps = accumulation
    args.steps_per_generation = steps_per_generation
    trainer.max_completion_length = 9
    trainer.aux_loss_enabled, trainer.router_aux_loss_coef = opts.get("moe_aux_loss", False), 0.02
    trainer.model.train(not opts.get("eval"))
    for mode in ("train", "eval"):
        trainer._metrics[mode].clear()


def run_formula(trainer, inputs, logp, entropy):
    leaves = [logp.clone().requires_grad_(True), entropy.clone().requires_grad_(True),
              torch.tensor(1.7, dtype=D, requires_grad=True)]  # the MoE auxiliary loss
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: tuple(leaves)
    try:
        loss = trainer._compute_loss(trainer.model, dict(inputs))
    finally:
        del trainer._get_per_token_logps_and_entropies
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    mode = "train" if trainer.model.training else "eval"
    metrics = {key: values[:] for key, values in trainer._metrics[mode].items()}
    state = (trainer.entropy_coef, trainer._last_world_entropy)
    return loss.detach(), grads, metrics, state


def assert_same_metrics(theirs, mine):
    assert sorted(theirs) == sorted(mine)
    for key in theirs:
        for a, b in zip(theirs[key], mine[key], strict=True):
            assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-9 * max(1.0, abs(a)), (key, a, b)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ours.LOSS_TYPES)
def test_compute_loss_matches_trl(pair, loss_type, level):
    theirs, mine = pair
    losses = {}
    for seed, (name, opts) in enumerate(OPTIONS.items()):
        if loss_type == "vespo" and opts.get("vllm") == "sequence":
            continue  # TRL refuses vespo with a sequence-level vLLM IS mode
        inputs, logp, entropy = formula_batch(seed if name != "plain" else 0, opts)
        results = []
        for trainer in (theirs, mine):
            configure(trainer, loss_type, level, opts)
            results.append(run_formula(trainer, inputs, logp, entropy))
        (loss_t, grads_t, metrics_t, state_t), (loss_m, grads_m, metrics_m, state_m) = results
        assert loss_t.dtype == loss_m.dtype == D, name
        torch.testing.assert_close(loss_m, loss_t, rtol=1e-9, atol=1e-9, msg=name)
        for g_m, g_t in zip(grads_m, grads_t):
            torch.testing.assert_close(g_m, g_t, rtol=1e-9, atol=1e-9, msg=name)
        assert_same_metrics(metrics_t, metrics_m)
        assert state_m == pytest.approx(state_t, rel=1e-12), name
        losses[name] = (loss_m, seed)
    # Every option reached the loss (where it can): same batch as "plain", different loss.
    for name, opts in OPTIONS.items():
        if name == "plain" or name not in losses or loss_type in INERT.get(name, ()):
            continue
        inputs, logp, entropy = formula_batch(0, opts)
        configure(mine, loss_type, level, opts)
        changed = run_formula(mine, inputs, logp, entropy)[0]
        configure(mine, loss_type, level, {})
        assert not torch.isclose(changed, losses["plain"][0], rtol=1e-12, atol=0), name


def test_masked_positions_are_not_read(pair):
    """NaN and inf wherever the completion mask is 0 change neither our loss nor its gradient
    (TRL multiplies by the mask, so its loss turns NaN; ours is the clean batch's)."""
    _, mine = pair
    opts = OPTIONS["everything"]
    for loss_type, level in itertools.product(ours.LOSS_TYPES, ("token", "sequence")):
        configure(mine, loss_type, level, opts)
        inputs, logp, entropy = formula_batch(7, opts)
        clean = run_formula(mine, inputs, logp, entropy)
        valid = (inputs["completion_mask"] * inputs["tool_mask"]).bool()
        poisoned = dict(inputs)
        for key in ("old_per_token_logps", "ref_per_token_logps", "sampling_per_token_logps"):
            poisoned[key] = torch.where(valid, inputs[key], math.nan)
        if loss_type != "vespo":  # vespo requires ratio 1 there (raises otherwise, tested below)
            poisoned["importance_sampling_ratio"] = torch.where(valid, inputs["importance_sampling_ratio"], math.inf)
        configure(mine, loss_type, level, opts)
        dirty = run_formula(mine, poisoned, logp, entropy)
        torch.testing.assert_close(dirty[0], clean[0], rtol=0, atol=0)
        for a, b in zip(dirty[1], clean[1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert_same_metrics(clean[2], dirty[2])


def test_vespo_ratio_outside_mask_raises(pair):
    _, mine = pair
    configure(mine, "vespo", "token", {"vllm": "token"})
    inputs, logp, entropy = formula_batch(1, {"vllm": "token"})
    inputs["importance_sampling_ratio"] = inputs["importance_sampling_ratio"].clone()
    inputs["importance_sampling_ratio"][1, 5] = 0.5
    with pytest.raises(ValueError, match="importance_sampling_ratio must be 1 outside the completion mask"):
        run_formula(mine, inputs, logp, entropy)
    inputs["importance_sampling_ratio"] = torch.ones(B, 1, dtype=D)
    with pytest.raises(ValueError, match=r"must be per token, shape \(6, 7\)"):
        run_formula(mine, inputs, logp, entropy)


def test_unsupported_settings_raise_and_patch(pair, model_dir, tmp_path):
    theirs, _ = pair
    bad = [
        ({"loss_type": "ppo"}, "loss_type must be one of"),
        ({"importance_sampling_level": "tokens"}, "importance_sampling_level must be one of"),
        ({"delta": 1.1}, r"delta must be a number > 1 \+ epsilon_high = 1.2"),
        ({"epsilon_low": 1.0}, r"epsilon must be a number in \(0, 1\)"),
        ({"loss_type": "cispo", "epsilon_high": 0.0}, "epsilon_high must be a finite number > 0"),
        ({"loss_type": "sapo", "sapo_temperature_neg": 0.0}, "sapo_temperature_neg must be"),
        ({"loss_type": "vespo", "use_vllm": True, "vllm_importance_sampling_clip_min": 1.5},
         "clip_min/max excluding 1"),
    ]
    for changes, message in bad:
        configure(theirs, "dapo", "token", {})
        theirs.vllm_importance_sampling_clip_min, theirs.vllm_importance_sampling_clip_max = None, 3.0
        for name, value in changes.items():
            setattr(theirs.args if name in ("delta", "sapo_temperature_neg") else theirs, name, value)
        with pytest.raises(ValueError, match=message):
            ours.patch(theirs)
        assert type(theirs) is trl.GRPOTrainer  # a refused patch leaves the trainer alone
    configure(theirs, "dapo", "token", {})
    with pytest.raises(TypeError, match="trainer must be a trl.GRPOTrainer"):
        ours.patch(object())
    with pytest.raises(ValueError, match="delta must be"):
        make_trainer(ours.GRPOTrainer, model_dir, tmp_path, delta=1.2)


def test_moe_auxiliary_loss_from_the_models_forward(model_dir, tmp_path):
    """A Mixture-of-Experts model's load-balancing loss comes with our log-probs from its own
    forward, equal to the one TRL's fused head computes (TRL's method, called unbound on the
    patched trainer, still runs its head)."""
    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=True, router_aux_loss_coef=0.02, bos_token_id=1, eos_token_id=EOS,
                           pad_token_id=0)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "moe")
    PreTrainedTokenizerFast.from_pretrained(model_dir).save_pretrained(tmp_path / "moe")
    trainer = ours.patch(make_trainer(trl.GRPOTrainer, str(tmp_path / "moe"), tmp_path))
    assert trainer.aux_loss_enabled
    ids = torch.randint(3, 64, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[1, 7:] = 0
    kwargs = dict(compute_entropy=True, compute_aux_loss=True)
    mine = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 5, **kwargs)
    theirs = trl.GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, mask, 5, **kwargs)
    torch.testing.assert_close(mine[2], theirs[2], rtol=1e-6, atol=0)
    assert mine[2].item() > 0 and mine[2].requires_grad
    for a, b in zip(mine[:2], theirs[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_patch_makes_a_trl_trainer_ours(pair, model_dir, tmp_path, monkeypatch):
    class MyTrainer(trl.GRPOTrainer):
        def marker(self):
            return "kept"

    trainer = make_trainer(MyTrainer, model_dir, tmp_path)
    assert ours.patch(trainer) is trainer and ours.patch(trainer) is trainer
    assert type(trainer).__name__ == "PpoFastMyTrainer" and isinstance(trainer, MyTrainer)
    assert trainer.marker() == "kept"
    _, mine = pair
    opts = OPTIONS["everything"]
    inputs, logp, entropy = formula_batch(11, opts)
    results = []
    for t in (trainer, mine):
        configure(t, "sapo", "token", opts)
        results.append(run_formula(t, inputs, logp, entropy))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    assert_same_metrics(results[1][2], results[0][2])
    spy = Spy(monkeypatch)
    ids = torch.randint(3, 64, (2, 6))
    trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.ones_like(ids), 3)
    assert spy.functional == 1 and spy.fused == 0


# --------------------------------------------------------------------------------------------
# (b) End to end, and (c) the spy
# --------------------------------------------------------------------------------------------

E2E = {
    "grpo": {"delta": 1.5},
    "bnpo": {},
    "dr_grpo": {},
    "dapo": {"entropy_coef": 0.01},
    "luspo": {"importance_sampling_level": "sequence"},
    "cispo": {"epsilon_high": 0.8},  # an absolute cap in TRL: binds for some tokens of this batch
    "sapo": {"importance_sampling_level": "sequence"},
    "vespo": {},
}


class Spy:
    """Counts calls of our op (through the public function and the torch.library op) and of
    TRL's fused LM head."""

    def __init__(self, monkeypatch):
        self.functional = self.op = self.fused = 0
        public, op, fused = functional.token_logprobs, token_logprobs_op, trl_utils._ChunkedLogProbFunction

        def spy_public(*args, **kwargs):
            self.functional += 1
            return public(*args, **kwargs)

        def spy_op(*args, **kwargs):
            self.op += 1
            return op(*args, **kwargs)

        class SpyFused(fused):
            @staticmethod
            def apply(*args):
                self.fused += 1
                return fused.apply(*args)

        monkeypatch.setattr(functional, "token_logprobs", spy_public)
        monkeypatch.setattr(token_logprobs_module, "token_logprobs_op", spy_op)
        monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", SpyFused)


class Record(TrainerCallback):
    """Per optimizer step: the parameter gradients, the loss, the share of valid tokens whose
    ratio left [0.8, 1.2], and the last micro-batch."""

    def __init__(self):
        self.grads, self.losses, self.off_policy, self.batch = [], [], [], None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def train_two_steps(cls, loss_type, model_dir, tmp_path):
    record = Record()

    class Recording(cls):
        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            record.losses.append(loss.detach().clone())
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            with torch.no_grad():
                logp = self._get_per_token_logps_and_entropies(model, ids, mask, inputs["completion_ids"].size(1))[0]
            moved = (logp - inputs["old_per_token_logps"]).exp().sub(1).abs() > 0.2
            record.off_policy.append(moved[inputs["completion_mask"].bool()].float().mean().item())
            record.batch = inputs
            return loss

    trainer = make_trainer(Recording, model_dir, tmp_path, callbacks=[record], loss_type=loss_type, beta=0.04,
                           temperature=0.9, learning_rate=10.0, optim="sgd", lr_scheduler_type="constant",
                           steps_per_generation=2, max_steps=2, logging_steps=1,
                           generation_kwargs={"sequence_bias": [[[EOS], 3.0]]}, **E2E[loss_type])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "train_loss" not in entry]
    return record, logs


@pytest.fixture(scope="module")
def end_to_end(model_dir, tmp_path_factory):
    spy_counts, results = {}, {}
    for loss_type in ours.LOSS_TYPES:
        runs = []
        for cls in (trl.GRPOTrainer, ours.GRPOTrainer):
            with pytest.MonkeyPatch.context() as monkeypatch:
                spy = Spy(monkeypatch)
                runs.append(train_two_steps(cls, loss_type, model_dir, tmp_path_factory.mktemp(loss_type)))
            spy_counts[loss_type, cls is ours.GRPOTrainer] = (spy.functional, spy.op, spy.fused)
        results[loss_type] = runs
    return results, spy_counts


NOT_COMPARED = {"step_time", "grad_norm", "epoch", "learning_rate"}


@pytest.mark.parametrize("loss_type", ours.LOSS_TYPES)
def test_training_step_matches_trl(end_to_end, loss_type):
    (theirs, logs_t), (mine, logs_m) = end_to_end[0][loss_type]
    assert len(theirs.losses) == len(mine.losses) == len(theirs.grads) == len(mine.grads) == 2
    # The batch exercises the loss: rewards vary within groups, completions end in EOS at
    # different lengths, and the second step is off-policy enough for clipping to bind.
    batch = mine.batch
    lengths = batch["completion_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1 and (batch["advantages"] != 0).all()
    last = batch["completion_ids"].gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    assert (last == EOS).any()
    assert mine.off_policy[0] == 0 and mine.off_policy[1] > 0.1
    if loss_type in ours.CLIPPED:
        assert logs_m[1]["clip_ratio/region_mean"] > 0 and logs_m[1]["clip_ratio/low_mean"] > 0
    if loss_type == "cispo":
        assert logs_m[1]["cispo_clip_ratio"] > 0
    if loss_type == "vespo":
        assert abs(logs_m[1]["vespo/phi_seq_mean"] - 1) > 1e-3
    for step in range(2):
        torch.testing.assert_close(mine.losses[step], theirs.losses[step], rtol=1e-5, atol=1e-6)
        assert theirs.grads[step].keys() == mine.grads[step].keys()
        for name, g_t in theirs.grads[step].items():
            scale = g_t.abs().max().item()
            torch.testing.assert_close(mine.grads[step][name], g_t, rtol=0, atol=3e-5 * scale + 1e-9,
                                       msg=f"step {step}: {name}")
        assert logs_t[step].keys() == logs_m[step].keys()
        for key, value in logs_t[step].items():
            if key not in NOT_COMPARED:
                assert logs_m[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_loss_types_give_different_losses(end_to_end):
    second_step = {lt: runs[1][0].losses[1].item() for lt, runs in end_to_end[0].items()}
    values = sorted(second_step.values())
    assert all(b - a > 1e-4 for a, b in zip(values, values[1:])), second_step


def test_logprobs_come_from_our_op(end_to_end):
    for loss_type in ours.LOSS_TYPES:
        calls_t = end_to_end[1][loss_type, False]
        calls_m = end_to_end[1][loss_type, True]
        assert calls_t[0] == calls_t[1] == 0 and calls_t[2] > 0  # TRL: its fused head only
        assert calls_m[0] > 0 and calls_m[1] == calls_m[0] and calls_m[2] == 0  # ours: our op only


def test_logprobs_are_the_models_logits_scored(pair, monkeypatch, force_backend):
    """Our log-probs and entropies are ``log_softmax(logits / temperature)`` of the model's own
    forward at the positions that predict the completion (an independent plain-torch oracle),
    and agree with TRL's fused head to float32 rounding; the Triton kernel (interpreted on the
    CPU) gives the same values and parameter gradients as the reference backend."""
    theirs, mine = pair
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left-padded prompt
    mask[1, 7:] = 0  # completion padding
    C = 5
    mine.temperature = 0.7  # read at each call (TRL's head keeps the temperature it was built with)
    spy = Spy(monkeypatch)
    logp, entropy, _ = mine._get_per_token_logps_and_entropies(mine.model, ids, mask, C, compute_entropy=True)
    assert spy.functional == 1 and spy.op == 1 and spy.fused == 0
    logits = mine.model(input_ids=ids, attention_mask=mask).logits[:, -C - 1:-1].double() / 0.7
    log_probs = torch.log_softmax(logits, -1)
    valid = mask[:, -C:].bool()
    expected = torch.where(valid, log_probs.gather(-1, ids[:, -C:, None]).squeeze(-1), 0.0)
    expected_entropy = torch.where(valid, -(log_probs.exp() * log_probs).sum(-1), 0.0)
    assert logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy.double(), expected_entropy, rtol=0, atol=1e-5)
    mine.temperature = 1.0
    logp, entropy, _ = mine._get_per_token_logps_and_entropies(mine.model, ids, mask, C, compute_entropy=True)
    trl_logp, trl_entropy, _ = theirs._get_per_token_logps_and_entropies(theirs.model, ids, mask, C,
                                                                          compute_entropy=True)
    assert spy.fused == 1 and spy.functional == 2
    torch.testing.assert_close(logp, trl_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, trl_entropy, rtol=0, atol=1e-5)

    def value_and_grads():
        mine.model.zero_grad()
        lp, ent, _ = mine._get_per_token_logps_and_entropies(mine.model, ids, mask, C, compute_entropy=True)
        (lp.sum() + 0.3 * ent.sum()).backward()
        return lp.detach(), [p.grad.clone() for p in mine.model.parameters() if p.grad is not None]

    with force_backend("reference"):
        ref_logp, ref_grads = value_and_grads()
    with force_backend("triton"):
        assert dispatch.choose("token_logprobs", ids.device) == "triton"
        tri_logp, tri_grads = value_and_grads()
    mine.model.zero_grad()
    torch.testing.assert_close(tri_logp, ref_logp, rtol=0, atol=1e-5)
    for a, b in zip(tri_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# (d) ppo_fast_head="fused": our fused linear head inside TRL's fused LM head call
# --------------------------------------------------------------------------------------------


class FusedHeadGRPO(ours.GRPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, ppo_fast_head="fused", **kwargs)


def test_the_fused_head_gives_trls_log_probs_entropy_and_gradients(pair, model_dir, tmp_path, monkeypatch):
    theirs, _ = pair
    mine = make_trainer(FusedHeadGRPO, model_dir, tmp_path)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[1, 7:] = 0
    calls = []
    fused = functional.fused_linear_token_logprobs
    monkeypatch.setattr(functional, "fused_linear_token_logprobs", lambda *a, **k: calls.append(1) or fused(*a, **k))
    spy = Spy(monkeypatch)
    trls_function = trl_utils._ChunkedLogProbFunction

    def value_and_grads(trainer):
        trainer.model.zero_grad()
        lp, ent, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 5, compute_entropy=True)
        (lp.sum() + 0.3 * ent.sum()).backward()
        return lp.detach(), ent.detach(), [p.grad.clone() for p in trainer.model.parameters()]

    logp, entropy, grads = value_and_grads(mine)
    assert calls and spy.functional == 0
    assert spy.fused == 0  # TRL's chunked function never ran: ours stood in for it, and is gone again
    assert trl_utils._ChunkedLogProbFunction is trls_function
    trl_logp, trl_entropy, trl_grads = value_and_grads(theirs)
    assert spy.fused == 1
    torch.testing.assert_close(logp, trl_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, trl_entropy, rtol=0, atol=1e-5)
    for got, expected in zip(grads, trl_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_training_steps_with_the_fused_head_match_trl(end_to_end, model_dir, tmp_path):
    (theirs, logs_t), _ = end_to_end[0]["grpo"]
    mine, logs_m = train_two_steps(FusedHeadGRPO, "grpo", model_dir, tmp_path)
    for step in range(2):
        torch.testing.assert_close(mine.losses[step], theirs.losses[step], rtol=1e-5, atol=1e-6)
        for name, g_t in theirs.grads[step].items():
            torch.testing.assert_close(mine.grads[step][name], g_t, rtol=0, atol=3e-5 * g_t.abs().max().item() + 1e-9,
                                       msg=f"step {step}: {name}")


def test_the_head_setting_is_checked(pair):
    theirs, _ = pair
    with pytest.raises(ValueError, match="ppo_fast_head must be one of 'logits', 'fused'; got 'chunked'"):
        ours.GRPOTrainer(model=None, ppo_fast_head="chunked")
    with pytest.raises(ValueError, match="head must be one of 'logits', 'fused'; got 'chunked'"):
        ours.patch(theirs, head="chunked")
    assert not isinstance(theirs, ours._PpoFastGRPO)
    with pytest.raises(NotImplementedError, match="soft-capping 30.0.*ppo_fast_head='logits'"):
        ours._FusedHeadForTRL(1.0).apply(torch.zeros(2, 4), torch.zeros(3, 4), None, torch.zeros(2, dtype=torch.long),
                                         1.0, 512, 30.0)
