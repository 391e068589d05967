"""The rewards of a run, from one spec string: reward models, Python functions, weighted sums of
them and conservative ensembles of reward models.

    --reward runs/rm/model                                    a reward-model directory
    --reward my_rewards:score                                 a function in an importable module
    --reward examples/sample/reward.py:exact_sum              a function in a file
    --reward "0.8*runs/rm/model,0.2*my_rewards:brevity"       a weighted sum
    --reward "ensemble(runs/rm1/model|runs/rm2/model|runs/rm3/model)"
                                                              mean − k·std over the models
                                                              (k: reward_ensemble_k)

A term is ``[WEIGHT*]SOURCE`` (a weight may be negative: ``-0.1*my_rewards:length`` is a length
penalty); terms are separated by commas. A reward-model directory holds an
``AutoModelForSequenceClassification`` whose first logit is the score, with its score head's
weights in the checkpoint (a causal LM is refused: its head would be random); it must tokenize
like the policy (same vocabulary), since it scores the policy's token ids as they are. A function is called
as ``fn(prompts, completions) -> scores`` with the prompt texts and the completion texts (decoded
without special tokens), and returns one finite number per completion.

The same grammar names the evaluation-only ``gold`` reward (a rule that knows the answer, or a
held-out reward model the policy never trained against).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..sequences import position_ids

WEIGHT = re.compile(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*(.+)")
FUNCTION = re.compile(r"(.+):([A-Za-z_][A-Za-z0-9_]*)")
ENSEMBLE = re.compile(r"ensemble\((.*)\)", re.DOTALL)


class RewardSpecError(ValueError):
    """A reward spec names something that is not a reward; the message says which term and why."""


class RewardError(ValueError):
    """A reward gave something that is not one finite score per completion; the message names
    the term, the prompt and the value."""


@dataclass
class Completions:
    """One batch of generated completions, in every form a reward may read."""

    prompts: list[str]
    sequences: torch.Tensor
    """``[B, P + N]`` prompt and completion token ids (left-padded prompts)."""
    attention_mask: torch.Tensor
    prompt_length: int
    tokenizer: object
    _texts: list[str] | None = field(default=None, repr=False)

    @property
    def completion_ids(self) -> list[list[int]]:
        return self.sequences[:, self.prompt_length:].tolist()

    @property
    def texts(self) -> list[str]:
        if self._texts is None:
            self._texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in self.completion_ids]
        return self._texts


class ModelReward:
    """A sequence classifier's first logit on the whole sequence."""

    def __init__(self, model, name: str):
        self.model, self.name = model, name

    def __call__(self, batch: Completions) -> torch.Tensor:
        mask = batch.attention_mask
        return self.model(input_ids=batch.sequences, attention_mask=mask,
                          position_ids=position_ids(mask)).logits[:, 0].float()


def call_user_function(name: str, fn: Callable, *args):
    """``fn(*args)``, where an exit from the user's code (``sys.exit``, ``exit()``) is an error
    naming the reward: it would otherwise end the run with that status and nothing recorded."""
    try:
        return fn(*args)
    except SystemExit as exc:
        raise RewardError(f"{name} called sys.exit({exc.code!r}); a reward function must return its scores "
                          "(raise an exception to report a failure)") from None


class FunctionReward:
    """``fn(prompts, completion_texts) -> scores``, each call on its own copies of the lists: a
    function that sorts or edits them in place must not reorder what the library records."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def __call__(self, batch: Completions) -> torch.Tensor:
        scores = call_user_function(self.name, self.fn, list(batch.prompts), list(batch.texts))
        return checked_scores(self.name, scores, batch)


class TokenReward:
    """``fn(prompt, completion_ids) -> float`` per sample: the embedded tasks' rules, which read
    token ids (an unended completion is visible there, not in its text)."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def __call__(self, batch: Completions) -> torch.Tensor:
        scores = [call_user_function(self.name, self.fn, p, c) for p, c in zip(batch.prompts, batch.completion_ids)]
        return checked_scores(self.name, scores, batch)


class Ensemble:
    """Conservative combination of reward models: mean − k·std over the models (sample std), so
    completions the models disagree on are scored down (Coste et al. 2023, "Reward Model
    Ensembles Help Mitigate Overoptimization")."""

    def __init__(self, members: list, k: float, name: str):
        if len(members) < 2:
            raise RewardSpecError(f"{name}: an ensemble needs at least 2 reward models, got {len(members)}")
        self.members, self.k, self.name = members, k, name

    def __call__(self, batch: Completions) -> torch.Tensor:
        scores = torch.stack([member(batch) for member in self.members])
        return scores.mean(0) - self.k * scores.std(0)


class WeightedSum:
    """Σ weight·term. ``parts`` gives each term's own scores (for the diagnostics)."""

    def __init__(self, terms: list[tuple[float, object]]):
        self.terms = terms
        self.name = ",".join(name_of(w, r) for w, r in terms)

    def parts(self, batch: Completions) -> dict[str, torch.Tensor]:
        return {name_of(w, r): finite(r.name, r(batch), batch) for w, r in self.terms}

    def combine(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(w * parts[name_of(w, r)] for w, r in self.terms)

    def __call__(self, batch: Completions) -> torch.Tensor:
        return self.combine(self.parts(batch))


def name_of(weight: float, reward) -> str:
    return reward.name if weight == 1.0 else f"{weight:g}*{reward.name}"


def checked_scores(name: str, scores, batch: Completions) -> torch.Tensor:
    """``scores`` as a float32 tensor ``[B]`` on the batch's device; a clear error otherwise."""
    try:
        # float64 first: a score beyond float32's range must be named as given, not as the inf
        # the cast would make of it.
        scores = torch.as_tensor(scores, dtype=torch.float64, device=batch.sequences.device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RewardError(f"{name} must return {len(batch.prompts)} numbers (one per completion), got "
                          f"{type(scores).__name__}: {exc}") from None
    if scores.shape != (len(batch.prompts),):
        raise RewardError(f"{name} must return {len(batch.prompts)} scores (one per completion), got shape "
                          f"{tuple(scores.shape)}")
    too_large = torch.isfinite(scores) & (scores.abs() > torch.finfo(torch.float32).max)
    if too_large.any():
        bad = too_large.nonzero()[0].item()
        raise RewardError(f"{name} gave {scores[bad].item()!r} for prompt {batch.prompts[bad][:40]!r}, beyond the "
                          f"float32 range the trainer scores in (|score| <= {torch.finfo(torch.float32).max:.4g})")
    return scores.float()


def finite(name: str, scores: torch.Tensor, batch: Completions) -> torch.Tensor:
    """``scores``, or a RewardError naming the term, the first prompt at fault and its value."""
    if not torch.isfinite(scores).all():
        bad = (~torch.isfinite(scores)).nonzero()[0].item()
        raise RewardError(f"the reward is not finite: {name} gave {scores[bad].item()} for prompt "
                          f"{batch.prompts[bad][:40]!r} (completion {batch.texts[bad][:40]!r})")
    return scores


def split_terms(spec: str) -> list[str]:
    """Commas outside parentheses separate terms."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            terms.append(spec[start:i])
            start = i + 1
    terms.append(spec[start:])
    return [t.strip() for t in terms]


def load_function(source: str) -> Callable:
    """``path/to/file.py:name`` or ``package.module:name``; raises RewardSpecError."""
    match = FUNCTION.fullmatch(source)
    if match is None:
        raise RewardSpecError(f"{source!r} is neither a reward-model directory (no config.json there) nor "
                              "module:function")
    module_name, attr = match.groups()
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise RewardSpecError(f"{source!r}: {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"ppo_fast_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise RewardSpecError(f"{source!r}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    else:
        # As `python -m`: modules beside the working directory import.
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise RewardSpecError(f"{source!r}: cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardSpecError(f"{source!r}: {module_name} has no function {attr!r}")
    return fn


def parse(spec: str) -> list[tuple[float, str]]:
    """``[(weight, source)]`` of a spec, checked for form (not for what the sources hold)."""
    if not spec.strip():
        raise RewardSpecError("the reward spec is empty")
    terms = []
    for term in split_terms(spec):
        if not term:
            raise RewardSpecError(f"{spec!r} has an empty term (two commas in a row, or a trailing comma)")
        match = WEIGHT.fullmatch(term)
        weight, source = (float(match.group(1)), match.group(2).strip()) if match else (1.0, term)
        terms.append((weight, source))
    return terms


def is_model_dir(source: str) -> bool:
    return (Path(source) / "config.json").is_file()


def ensemble_members(source: str) -> list[str] | None:
    """The reward-model directories of an ``ensemble(DIR|DIR|...)`` term, or None for another term."""
    ensemble = ENSEMBLE.fullmatch(source)
    return [member.strip() for member in ensemble.group(1).split("|")] if ensemble else None


def model_directories(spec: str) -> list[str]:
    """Every reward-model directory ``spec`` names, ensemble members included."""
    return [d for _, source in parse(spec) for d in ensemble_members(source) or [source] if is_model_dir(d)]


def check_spec(spec: str, field_name: str) -> None:
    """Every term of ``spec`` exists: model directories hold a reward model with the weights of its
    score head (modeldir.check_reward_model: ConfigError), functions import (RewardSpecError).
    Either error names the field."""
    from .modeldir import check_reward_model

    try:
        for _, source in parse(spec):
            members = ensemble_members(source)
            if members is not None and len(members) < 2:
                raise RewardSpecError(f"{source!r}: an ensemble needs at least 2 reward models")
            for member in members or []:
                if not is_model_dir(member):
                    raise RewardSpecError(f"ensemble member {member!r} is not a reward-model directory "
                                          "(no config.json there)")
                check_reward_model(field_name, member)
            if members is None:
                if is_model_dir(source):
                    check_reward_model(field_name, source)
                else:
                    load_function(source)
    except RewardSpecError as exc:
        raise RewardSpecError(f"{field_name}: {exc}") from None


def build(spec: str, *, load_model: Callable[[str], object], ensemble_k: float) -> WeightedSum:
    """The reward of ``spec``. ``load_model(directory)`` returns a ready (frozen, placed) sequence
    classifier."""
    terms = []
    for weight, source in parse(spec):
        members = ensemble_members(source)
        if members is not None:
            reward = Ensemble([ModelReward(load_model(d), d) for d in members], ensemble_k, source)
        elif is_model_dir(source):
            reward = ModelReward(load_model(source), source)
        else:
            reward = FunctionReward(load_function(source), source)
        terms.append((weight, reward))
    return WeightedSum(terms)


def same_vocabulary(policy_tokenizer, directory: str, what: str = "reward model") -> str | None:
    """Why the model in ``directory`` (``what``: a reward model, a critic, a reference) cannot read
    the policy's token ids, or None. A directory without tokenizer files is taken at its word."""
    from transformers import AutoTokenizer

    try:
        theirs = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        return None
    if theirs.get_vocab() != policy_tokenizer.get_vocab():
        return (f"{what} {directory} tokenizes differently from the policy (vocabularies of "
                f"{len(theirs.get_vocab())} and {len(policy_tokenizer.get_vocab())} tokens differ); it reads "
                "the policy's token ids as they are, so it must share the policy's tokenizer")
    return None
