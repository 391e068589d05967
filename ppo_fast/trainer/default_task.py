"""The embedded tasks: RLHF end to end on a CPU in minutes, with no download.

``vowels`` (the default, ``ppo-fast`` with no arguments), learned from preferences:

* Tokens: a character tokenizer (a Hugging Face fast tokenizer) over the 26 lowercase letters
  plus <pad>, <bos>, <eos>, <sep>.
* Prompts: ``<bos> 4-8 random letters <sep>``; a response is letters ending in ``<eos>``.
* Warm-up: supervised training of a tiny Llama-style policy on random well-formed responses
  (uniform letters, 3-9 of them), so it answers in the right format before RL starts.
* Gold reward (what the preferences mean, used only to evaluate): the number of vowels in the
  response, minus 1 when the response is not ended by <eos>.
* Proxy reward: a tiny Llama sequence classifier trained on synthetic preference pairs labelled by
  the gold reward (Bradley-Terry). PPO optimises the proxy, with a KL penalty to the warm-up
  policy; the gold reward shows whether that helped.

``arithmetic``, a verifiable task for critic-free training (GRPO, RLOO, ...):

* Prompts: ``<bos> a+b= <sep>`` with single digits a, b; the answer is the sum's digits then <eos>.
* Warm-up: right answers, briefly (the default 150 steps leave the tiny policy right about 60% of
  the time when it samples at temperature 1, 89% greedily), so RL has something to learn.
* Reward and gold: the rule (1 for exactly the right answer ended by <eos>, else 0).

``arithmetic-hackable``: the same, trained against a proxy with a built-in length bias
(correctness + 0.5 per answer token, as a reward model that learned "longer is better" would
score), while the rule stays the gold. Longer answers are wrong answers here, so the policy games
the proxy; the run's reward-hacking alarms must fire, where ``arithmetic`` stays quiet.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..sequences import left_pad, position_ids

LETTERS = string.ascii_lowercase
VOWELS = set("aeiou")
PAD, BOS, EOS, SEP = 0, 1, 2, 3
SPECIALS = ["<pad>", "<bos>", "<eos>", "<sep>"]


DIGITS = "0123456789+="
CONTEXT = 64
"""Tokens the tasks' models attend to (their max_position_embeddings): a prompt and its completion."""
TRAINING_PROMPTS = 4096
"""Prompts a task generates for a training run."""


def char_tokenizer(alphabet: str = LETTERS):
    """A Hugging Face ``PreTrainedTokenizerFast`` over the single characters of ``alphabet``
    (``<bos>`` and ``<sep>`` added around a prompt), so the exported models load with
    ``AutoTokenizer`` like any other."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + list(alphabet))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <sep>", special_tokens=[("<bos>", BOS), ("<sep>", SEP)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", sep_token="<sep>")


def gold_reward(prompt: str, completion_ids: list[int]) -> float:
    """Vowels in the response, minus 1 if it is not ended by <eos>."""
    ended = EOS in completion_ids
    body = completion_ids[: completion_ids.index(EOS)] if ended else completion_ids
    vowels = sum(1 for i in body if i >= len(SPECIALS) and LETTERS[i - len(SPECIALS)] in VOWELS)
    return float(vowels) - (0.0 if ended else 1.0)


def make_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(LETTERS) for _ in range(rng.randint(4, 8))) for _ in range(n)]


def llama_config(vocab: int, **overrides):
    from transformers import LlamaConfig

    settings = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                    bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False,
                    attn_implementation="sdpa")
    settings.update(overrides)
    return LlamaConfig(**settings)


def _random_response(rng: random.Random, vowel_prob: float) -> list[int]:
    vowels, consonants = sorted(VOWELS), sorted(set(LETTERS) - VOWELS)
    length = rng.randint(3, 9)
    letters = [rng.choice(vowels) if rng.random() < vowel_prob else rng.choice(consonants)
               for _ in range(length)]
    return [len(SPECIALS) + LETTERS.index(c) for c in letters] + [EOS]


def make_sums(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.randrange(10)}+{rng.randrange(10)}=" for _ in range(n)]


def _answer_ids(text: str) -> list[int]:
    return [len(SPECIALS) + DIGITS.index(c) for c in text] + [EOS]


def _sum_demonstration(prompt: str, rng: random.Random) -> list[int]:
    a, b = prompt.rstrip("=").split("+")
    return _answer_ids(str(int(a) + int(b)))


def _answer_text(completion_ids: list[int]) -> tuple[str, bool]:
    """The completion's characters before <eos>, and whether <eos> ended it."""
    ended = EOS in completion_ids
    body = completion_ids[: completion_ids.index(EOS)] if ended else completion_ids
    return "".join(DIGITS[i - len(SPECIALS)] if len(SPECIALS) <= i < len(SPECIALS) + len(DIGITS) else "?"
                   for i in body), ended


def exact_sum(prompt: str, completion_ids: list[int]) -> float:
    """1 for exactly the digits of the sum ended by <eos>, else 0."""
    a, b = prompt.rstrip("=").split("+")
    text, ended = _answer_text(completion_ids)
    return float(ended and text == str(int(a) + int(b)))


def length_biased_sum(prompt: str, completion_ids: list[int]) -> float:
    """The hackable proxy: correctness + 0.5 per answer token (ended or not)."""
    text, _ = _answer_text(completion_ids)
    return exact_sum(prompt, completion_ids) + 0.5 * len(text)


@dataclass(frozen=True)
class Task:
    """An embedded task: everything a run needs, built from code."""

    alphabet: str
    make_prompts: Callable[[int, int], list[str]]
    """``(n, seed) -> prompts``."""
    demonstration: Callable[[str, random.Random], list[int]]
    """A warm-up target (token ids ending in <eos>) for a prompt."""
    gold: Callable[[str, list[int]], float]
    """What the task means: evaluation only (and the reward where ``proxy`` is ``gold``)."""
    proxy: Callable[[str, list[int]], float] | None
    """The rule the policy is trained against; None: a Bradley-Terry reward model trained on
    preference pairs labelled by the gold reward."""


TASKS = {
    "vowels": Task(LETTERS, make_prompts, lambda prompt, rng: _random_response(rng, vowel_prob=5 / 26),
                   gold_reward, None),
    "arithmetic": Task(DIGITS, make_sums, _sum_demonstration, exact_sum, exact_sum),
    "arithmetic-hackable": Task(DIGITS, make_sums, _sum_demonstration, exact_sum, length_biased_sum),
}


def training_prompts(task: str, seed: int) -> list[str]:
    """The prompts task ``task`` trains on in a run of seed ``seed``."""
    return TASKS[task].make_prompts(TRAINING_PROMPTS, seed)


def held_out_prompts(task: str, seed: int, n: int) -> list[str]:
    """The first ``n`` evaluation prompts of task ``task`` for seed ``seed`` (none of a run's
    training prompts' stream)."""
    return TASKS[task].make_prompts(n, seed + 999)


def warm_up_policy(steps: int, seed: int, log=print, task: str = "vowels") -> nn.Module:
    """Supervised warm-up on the task's demonstrations."""
    from transformers import LlamaForCausalLM

    spec = TASKS[task]
    torch.manual_seed(seed)
    rng = random.Random(seed + 1)
    tok = char_tokenizer(spec.alphabet)
    model = LlamaForCausalLM(llama_config(tok.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        rows, prompt_lens = [], []
        for prompt in spec.make_prompts(32, rng.randrange(2**31)):
            p = tok.encode(prompt, add_special_tokens=True)
            rows.append(p + spec.demonstration(prompt, rng))
            prompt_lens.append(len(p))
        ids, mask = left_pad(rows, PAD)
        labels = ids.clone()
        for i, (row, p_len) in enumerate(zip(rows, prompt_lens)):
            labels[i, : ids.shape[1] - len(row) + p_len] = -100  # learn the response only
        loss = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                     labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"warm-up step {step:4d}  loss {loss.item():.3f}")
    return model.eval()


def train_reward_model(steps: int, seed: int, log=print) -> nn.Module:
    """Bradley-Terry reward model on synthetic pairs labelled by the gold reward."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed + 2)
    rng = random.Random(seed + 3)
    tok = char_tokenizer()
    model = LlamaForSequenceClassification(llama_config(tok.vocab_size, num_labels=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    accuracy = 0.0
    for step in range(steps):
        chosen, rejected = [], []
        while len(chosen) < 32:
            prompt = tok.encode(make_prompts(1, rng.randrange(2**31))[0], add_special_tokens=True)
            a = _random_response(rng, rng.random())
            b = _random_response(rng, rng.random())
            if rng.random() < 0.1:
                a = a[:-1]  # some unended responses, so the penalty is learned
            ga, gb = gold_reward("", a), gold_reward("", b)
            if ga == gb:
                continue
            chosen.append(prompt + (a if ga > gb else b))
            rejected.append(prompt + (b if ga > gb else a))
        ids, mask = left_pad(chosen + rejected, PAD)
        scores = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, 0]
        margin = scores[:32] - scores[32:]
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        accuracy = 0.9 * accuracy + 0.1 * (margin > 0).float().mean().item()
        if step % 100 == 0 or step == steps - 1:
            log(f"reward-model step {step:4d}  loss {loss.item():.3f}  pair accuracy {accuracy:.2f}")
    return model.eval()
