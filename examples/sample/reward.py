"""The gold reward of the sample chain: is the completion the right sum?

    ppo-fast ... --gold examples/sample/reward.py:exact_sum
"""

from __future__ import annotations

import re

PROMPT = re.compile(r"\s*(\d)\s*\+\s*(\d)\s*=\s*$")


def exact_sum(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 for each completion that, stripped of surrounding white space, is the sum its prompt
    ("3+4=") asks for, else 0.0."""
    rewards = []
    for prompt, completion in zip(prompts, completions, strict=True):
        match = PROMPT.search(prompt)
        if match is None:
            raise ValueError(f"not a single-digit addition prompt: {prompt!r}")
        rewards.append(1.0 if completion.strip() == str(int(match[1]) + int(match[2])) else 0.0)
    return rewards
