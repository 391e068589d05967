"""``ppo-fast eval``: a trained policy on held-out prompts, scored by every reward given, against a
reference policy.

    ppo-fast eval --policy runs/ppo/final_policy --reference runs/sft/model \
        --prompts eval_prompts.jsonl --reward runs/rm/model --gold my_rules:exact

Writes ``<output_dir>/<run_name>/``: ``samples.jsonl`` (one line per prompt: both completions,
every score, length, KL), ``summary.json`` (the reward-hacking diagnostics of diagnostics.py for
the policy and the reference, win rates of the policy over the reference by the trained reward and
by gold, KL to the reference) and ``eval.png``. One process (under a launcher, run it on one rank).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, RunConfig, _above, _at_least


@dataclass
class EvalConfig(RunConfig):
    run_name: str = ""
    """Name of the evaluation; its files go to <output_dir>/<run_name>/. Empty: a fresh name from
    the date and time. An existing directory is refused unless overwrite is set (an empty one is
    reused)."""
    output_dir: str = "runs"
    """Directory that holds run directories."""
    overwrite: bool = False
    """Delete an existing directory of the same name first (refused when the evaluation would
    delete its own input: the policy, reference, prompts or a reward's model inside it). There is
    no resume: an evaluation has no checkpoints and writes its files when it ends, so an
    interrupted one leaves its directory empty and runs again under the same name without
    overwrite."""
    seed: int = 0
    """Seed of the sampling."""
    policy: str = ""
    """Hugging Face causal-LM directory of the policy to evaluate (e.g. a run's final_policy)."""
    reference: str = ""
    """Causal-LM directory to compare with (win rates, KL), e.g. the SFT model; empty: none."""
    prompts: str = ""
    """Held-out prompts: JSON/JSONL/Parquet/CSV with a "prompt" (or chat "messages") column, or a
    text file with one prompt per line; empty with task: the embedded task's."""
    task: str = ""
    """An embedded task (vowels, arithmetic, arithmetic-hackable) whose held-out prompts and gold
    rule to use; empty: none."""
    reward: str = ""
    """The trained reward, in the form of train's reward (reward-model directory with its trained
    score head, module:function, weighted list, ensemble(...)); empty: the task's rule reward when
    it has one, else gold."""
    reward_ensemble_k: float = 1.0
    """k of an ensemble's mean - k * std."""
    gold: str = ""
    """An evaluation-only reward in the same form (with task: the task's gold rule)."""
    num_prompts: int = 256
    """Evaluate on at most this many prompts (the first ones)."""
    samples_per_prompt: int = 1
    """Completions per prompt and policy (the i-th of the policy is compared with the i-th of the
    reference): more samples, less noise on a few prompts."""
    max_prompt_len: int = 256
    """Prompts longer than this many tokens are an error."""
    max_new_tokens: int = 64
    """Tokens generated per prompt; the longest prompt plus these must fit the policy's context
    (max_position_embeddings), checked before any work."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling (1: off)."""
    batch_size: int = 32
    """Prompts per generation batch."""

    RANGES = {
        **{name: _at_least(1) for name in ("num_prompts", "samples_per_prompt", "max_prompt_len", "max_new_tokens",
                                           "batch_size")},
        "seed": ((lambda v: 0 <= v < 2**32), "in [0, 2**32)"),
        "temperature": _above(0),
        "top_p": ((lambda v: 0 < v <= 1), "in (0, 1]"),
        "reward_ensemble_k": _at_least(0),
        "output_dir": ((lambda v: bool(v)), "a directory"),
        "task": ((lambda v: v in ("", "vowels", "arithmetic", "arithmetic-hackable")),
                 "empty or one of vowels, arithmetic, arithmetic-hackable"),
    }

    def check(self) -> None:
        if not self.policy:
            raise ConfigError("policy is required: the Hugging Face directory of the policy to evaluate")
        if not self.prompts and not self.task:
            raise ConfigError("prompts is required (a file of held-out prompts), or task for an embedded task's")
        if not (self.reward or self.gold or self.task):
            raise ConfigError("nothing to score with: give reward, gold (or a task, which brings its gold rule)")


def check_eval_files(config: EvalConfig) -> None:
    """Every model directory and file the evaluation reads is whole (modeldir.py, and the
    prompts), and each prompt with max_new_tokens fits the policy's context, before the run
    directory is made."""
    from .config import check_prompt_lengths, check_prompts_file, check_reward_specs
    from .default_task import held_out_prompts
    from .modeldir import check_model_dir, load_tokenizer, model_config

    check_model_dir("policy", config.policy)
    # Chat prompts become text through the policy's chat template; lengths count its tokens.
    tokenizer = load_tokenizer("policy", config.policy)
    if config.reference:
        check_model_dir("reference", config.reference)
    check_reward_specs(config, "reward", "gold")
    room = dict(max_new_tokens=config.max_new_tokens, model=f"policy {config.policy}",
                context=getattr(model_config("policy", config.policy), "max_position_embeddings", None))
    if config.prompts:
        check_prompts_file("prompts", config.prompts, tokenizer, config.max_prompt_len, limit=config.num_prompts,
                           **room)
    else:
        check_prompt_lengths("task", f"the {config.task} task's held-out prompts",
                             held_out_prompts(config.task, config.seed, config.num_prompts), tokenizer,
                             config.max_prompt_len, **room)


def _win_rate(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Share of prompts where ours scores higher; ties count half."""
    return float(np.mean((ours > theirs) + 0.5 * (ours == theirs)))


def evaluate(config: EvalConfig, log=print) -> dict:
    """Run the evaluation; returns the summary (also in ``summary.json``)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ..distributed import init_distributed
    from ..head import completion_logprobs, fused_head_unsupported
    from ..hybrid import HybridEngine
    from . import default_task, diagnostics, rewards
    from .modeldir import load_reward_model, load_tokenizer
    from .prompts import encode_prompts, load_prompts
    from .rundir import prepare_run_dir, release

    check_eval_files(config)
    hf_logging.disable_progress_bar()
    init_distributed()
    if torch.distributed.get_world_size() > 1:
        raise ConfigError("eval runs as one process: start it with python or ppo-fast, not a launcher")
    config = prepare_run_dir(config, log)
    try:
        start = time.perf_counter()
        run_dir = Path(config.output_dir) / config.run_name
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        tokenizer = load_tokenizer("policy", config.policy)

        def load_causal(directory):
            return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()

        def reward_model_loader(field_name):
            def load(directory):
                reason = rewards.same_vocabulary(tokenizer, directory)
                if reason:
                    raise ConfigError(f"{field_name}: {reason}")
                return load_reward_model(field_name, directory, dtype=dtype).to(device).eval()

            return load

        task = default_task.TASKS[config.task] if config.task else None
        if task is not None and tokenizer.get_vocab() != default_task.char_tokenizer(task.alphabet).get_vocab():
            raise ConfigError(f"task: the rules of task {config.task!r} read the token ids of its own character "
                              "tokenizer, and the policy tokenizes differently; score it with a text rule instead "
                              "(gold: module:function)")
        if config.prompts:
            prompts = load_prompts(config.prompts, tokenizer)
        else:
            prompts = default_task.held_out_prompts(config.task, config.seed, config.num_prompts)
        prompts = [p for p in prompts[:config.num_prompts] for _ in range(config.samples_per_prompt)]
        reward = (rewards.build(config.reward, load_model=reward_model_loader("reward"),
                                ensemble_k=config.reward_ensemble_k) if config.reward else None)
        if config.gold:
            gold = rewards.build(config.gold, load_model=reward_model_loader("gold"),
                                 ensemble_k=config.reward_ensemble_k)
        elif task is not None:
            gold = rewards.WeightedSum([(1.0, rewards.TokenReward(task.gold, "gold"))])
        else:
            gold = None
        if reward is None and task is not None and task.proxy is not None:
            reward = rewards.WeightedSum([(1.0, rewards.TokenReward(task.proxy, f"{config.task} reward"))])
        reward = reward or gold
        models = {"policy": load_causal(config.policy)}
        if config.reference:
            reason = rewards.same_vocabulary(tokenizer, config.reference, "reference")
            if reason:
                raise ConfigError(f"reference: {reason}")
            models["reference"] = load_causal(config.reference)

        decided: dict[int, bool] = {}

        def fused_head(model, sequences, attention_mask) -> bool:
            # The probe runs the model once more: once per model, on its first batch.
            if id(model) not in decided:
                decided[id(model)] = fused_head_unsupported(model, sequences, attention_mask) is None
            return decided[id(model)]

        records = [{"prompt": p, "sample": i % config.samples_per_prompt} for i, p in enumerate(prompts)]
        columns: dict[str, dict[str, list]] = {name: {} for name in models}
        for name, model in models.items():
            torch.manual_seed(config.seed)
            engine = HybridEngine(model, tokenizer, max_new_tokens=config.max_new_tokens, do_sample=True,
                                  temperature=config.temperature, top_p=config.top_p)
            for first in range(0, len(prompts), config.batch_size):
                chunk = prompts[first:first + config.batch_size]
                with torch.no_grad():
                    ids, mask = encode_prompts(tokenizer, chunk, config.max_prompt_len, device)
                    out = engine.generate(ids, attention_mask=mask)
                    P = out.prompt_length
                    batch = rewards.Completions(chunk, out.sequences, out.attention_mask, P, tokenizer)
                    parts = reward.parts(batch)
                    scores = {"reward": reward.combine(parts)}
                    if len(parts) > 1:
                        scores.update({f"reward[{k}]": v for k, v in parts.items()})
                    if gold is not None:
                        scores["gold"] = gold(batch)
                    completion_mask = out.completion_mask[:, P:]
                    kl = None
                    if name == "policy" and "reference" in models:
                        logp, ref_logp = (
                            completion_logprobs(m, out.sequences, out.attention_mask, P,
                                                temperature=config.temperature,
                                                fused=fused_head(m, out.sequences, out.attention_mask))
                            for m in (model, models["reference"]))
                        kl = diagnostics.sequence_kl(logp, ref_logp, completion_mask)
                values = {"completion": batch.texts,
                          "tokens": diagnostics.completion_tokens(batch.completion_ids, completion_mask),
                          "length": completion_mask.sum(-1).tolist(),
                          **{k: v.tolist() for k, v in scores.items()}}
                if kl is not None:
                    values["kl"] = kl.tolist()
                for key, value in values.items():
                    columns[name].setdefault(key, []).extend(value)

        summary = {"policy_dir": config.policy, "reference_dir": config.reference or None,
                   "prompts": len(prompts) // config.samples_per_prompt, "samples": len(prompts)}
        for name, col in columns.items():
            parts = {k[len("reward["):-1]: torch.tensor(v) for k, v in col.items() if k.startswith("reward[")}
            kl = torch.tensor(col["kl"]) if "kl" in col else None
            metrics = diagnostics.sample_metrics(
                col["tokens"], parts, torch.tensor(col["reward"]), torch.tensor(col["gold"]) if "gold" in col else None,
                kl)
            summary[name] = metrics
        if "reference" in columns:
            ours, theirs = columns["policy"], columns["reference"]
            summary["win_rate_reward"] = _win_rate(np.array(ours["reward"]), np.array(theirs["reward"]))
            if "gold" in ours:
                summary["win_rate_gold"] = _win_rate(np.array(ours["gold"]), np.array(theirs["gold"]))
        summary["seconds"] = time.perf_counter() - start

        for i, record in enumerate(records):
            for name, col in columns.items():
                record[name] = {k: v[i] for k, v in col.items() if k != "tokens"}
        _write_atomically(run_dir / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        _write_atomically(run_dir / "summary.json", json.dumps(summary, indent=2))
        _plot(run_dir, columns, log)
        log(format_eval(summary, run_dir))
        return summary
    finally:
        release(config)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _plot(run_dir: Path, columns: dict, log) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install 'ppo-fast[train]')")
        return
    panels = [k for k in ("reward", "gold", "length") if k in columns["policy"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8))
    for ax, key in zip(np.atleast_1d(axes), panels):
        for name, col in columns.items():
            ax.hist(col[key], bins=20, alpha=0.5, label=name)
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "eval.png", dpi=100)
    plt.close(fig)


def format_eval(summary: dict, run_dir: Path) -> str:
    names = [n for n in ("policy", "reference") if summary.get(n) is not None]
    keys = [k for k in ("proxy_reward", "gold_reward", "response_length", "reward_per_token", "length_r2",
                        "distinct_1", "distinct_2", "repetition", "kl") if k in summary["policy"]]
    lines = ["", f"{'':18}" + "".join(f"{n:>12}" for n in names)]
    for key in keys:
        label = "trained reward" if key == "proxy_reward" else key.replace("_", " ")
        lines.append(f"{label:18}" + "".join(f"{summary[n][key]:>12.3f}" if key in summary[n] else f"{'-':>12}"
                                             for n in names))
    for key in ("win_rate_reward", "win_rate_gold"):
        if key in summary:
            lines.append(f"{key.replace('_', ' ')} of the policy over the reference: {summary[key]:.3f}")
    lines.append(f"{summary['samples']} samples of {summary['prompts']} prompts in {summary['seconds']:.0f} s; "
                 f"{run_dir} (samples.jsonl, summary.json, eval.png)")
    return "\n".join(lines)
