"""Makes the sample data of the README's chain sft -> rm -> train -> eval (run it from anywhere;
it rewrites the files next to it, the same bytes every time).

The task is single-digit addition: the prompt "3+4=", the response "7". There are 100 distinct
problems.

* base/             a tiny Llama causal LM without weights (config.json) and its character-level
                    tokenizer; ``ppo-fast sft`` starts it from fresh weights.
* sft.jsonl         prompt/response rows, 5 per problem; 30% of the responses are wrong (a random
                    other sum), so the fine-tuned model still answers wrongly at times when it
                    samples, and PPO has something to improve.
* chat_sft.jsonl    a few rows in the chat format (a ``messages`` list), to show that it works.
* prefs.jsonl       prompt/chosen/rejected rows, 4 per problem: chosen the right sum, rejected a
                    wrong one.
* prompts.jsonl     the PPO training prompts: 80 of the problems.
* eval_prompts.jsonl the other 20 problems, never a PPO training prompt.
* reward.py         ``exact_sum``, the gold reward of the evaluation.

sft.jsonl and prefs.jsonl cover all 100 problems: they teach the answers (noisily); the PPO
evaluation then measures whether what RL improves on its 80 training prompts carries over to 20
prompts it never saw.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 0
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = list("0123456789+= ")
PAD, BOS, EOS = 0, 1, 2
NOISE = 0.3
# Each turn's text, an assistant turn ended by <eos>, and no generation prompt: a conversation
# [user "3+4=", assistant "7"] is the same example as prompt "3+4=" with response "7".
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['content'] }}"
                 "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}")


def tokenizer():
    """A character-level Hugging Face fast tokenizer that puts <bos> before a prompt."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                        special_tokens=[("<bos>", BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                  eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def base_config():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=len(SPECIALS) + len(CHARS), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=BOS, eos_token_id=EOS,
                         pad_token_id=PAD, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    return config


def wrong_sum(rng: random.Random, a: int, b: int) -> str:
    return str(rng.choice([s for s in range(19) if s != a + b]))


def write_jsonl(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    rng = random.Random(SEED)
    problems = [(a, b) for a in range(10) for b in range(10)]

    base = HERE / "base"
    base_config().save_pretrained(base)
    tokenizer().save_pretrained(base)

    sft = []
    for a, b in problems * 5:
        response = wrong_sum(rng, a, b) if rng.random() < NOISE else str(a + b)
        sft.append({"prompt": f"{a}+{b}=", "response": response})
    rng.shuffle(sft)
    write_jsonl("sft.jsonl", sft)

    chat = [{"messages": [{"role": "user", "content": f"{a}+{b}="},
                          {"role": "assistant", "content": str(a + b)}]}
            for a, b in rng.sample(problems, 6)]
    (a, b), (c, d) = rng.sample(problems, 2)
    chat.append({"messages": [{"role": "user", "content": f"{a}+{b}="},
                              {"role": "assistant", "content": str(a + b)},
                              {"role": "user", "content": f"{c}+{d}="},
                              {"role": "assistant", "content": str(c + d)}]})
    write_jsonl("chat_sft.jsonl", chat)

    prefs = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": wrong_sum(rng, a, b)}
             for a, b in problems * 4]
    rng.shuffle(prefs)
    write_jsonl("prefs.jsonl", prefs)

    held_out = set(rng.sample(problems, 20))
    write_jsonl("prompts.jsonl", [{"prompt": f"{a}+{b}="} for a, b in problems if (a, b) not in held_out])
    write_jsonl("eval_prompts.jsonl", [{"prompt": f"{a}+{b}="} for a, b in problems if (a, b) in held_out])


if __name__ == "__main__":
    main()
