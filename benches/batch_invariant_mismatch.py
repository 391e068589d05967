"""The mismatch batch_invariant() removes, measured: one sequence's logits and log-probs computed
alone against the same sequence inside left-padded, shuffled batches and decoded one token at a
time against the KV cache, with the mode off and on, for each architecture, dtype and width.

    python benches/batch_invariant_mismatch.py --out benches/results/batch_invariant_mismatch_cpu.md
    python benches/batch_invariant_mismatch.py --smoke     # one architecture, one width

Random small configs (2 layers, 4 query heads over 2 key heads, vocabulary 256). Each figure is the
largest difference over the sequence's positions: |Δlogit| over the vocabulary, |Δlogp| of the
sequence's own next tokens (``pf.token_logprobs``), and the fraction of logits whose bits differ.
"""

import argparse
import sys
from pathlib import Path

import torch
import transformers

import ppo_fast as pf
from ppo_fast.sequences import position_ids

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import publish  # noqa: E402

VOCABULARY = 256
BATCHES = {"batch of 3, left padding 2": (2, 2), "batch of 8": (7, 0), "batch of 5, left padding 4": (4, 4)}


def config(arch: str, hidden: int):
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCABULARY, n_embd=hidden, n_layer=2, n_head=4, bos_token_id=0,
                                       eos_token_id=0)
    family = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
              "mistral": transformers.MistralConfig}[arch]
    return family(vocab_size=VOCABULARY, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0)


@torch.no_grad()
def logits_in_a_batch(model, seq, others, padding):
    """``seq``'s logits at its own positions, inside a shuffled batch with ``others``, ``padding``
    extra pad tokens on its left."""
    rows = [seq, *others]
    width = max(len(seq) + padding, *(len(o) for o in others))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(width))
    logits = model(ids[order], attention_mask=mask[order], position_ids=position_ids(mask[order])).logits
    return logits[torch.argsort(order)[0], width - len(seq):]


@torch.no_grad()
def logits_decoded(model, seq):
    cache, steps = None, []
    for t in range(len(seq)):
        out = model(seq[None, t:t + 1], cache=cache, use_cache=True, position_ids=torch.tensor([[t]]))
        cache = out.past_key_values
        steps.append(out.logits[0, -1])
    return torch.stack(steps)


def difference(seq, alone, other) -> dict:
    logp = lambda z: pf.token_logprobs(z[:-1].float(), seq[1:])  # noqa: E731
    return {"logit": (other.float() - alone.float()).abs().max().item(),
            "logp": (logp(other) - logp(alone)).abs().max().item(),
            "unequal": (other != alone).float().mean().item()}


def worst(differences: list[dict]) -> dict:
    return {key: max(d[key] for d in differences) for key in differences[0]}


def measure(arch: str, dtype: torch.dtype, hidden: int) -> dict:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(arch, hidden)).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(1, VOCABULARY, (11,), generator=g)
    others = [torch.randint(1, VOCABULARY, (n,), generator=g) for n in (5, 13, 8, 11, 3, 9, 12)]
    result = {}
    for mode in ("off", "on"):
        if mode == "on":
            pf.enable_batch_invariant()
        try:
            with torch.no_grad():
                alone = model(seq[None]).logits[0]
            batched = [logits_in_a_batch(model, seq, others[:count], padding) for count, padding in BATCHES.values()]
            result[mode] = {"in a batch": worst([difference(seq, alone, z) for z in batched]),
                            "decoded": difference(seq, alone, logits_decoded(model, seq))}
        finally:
            if mode == "on":
                pf.disable_batch_invariant()
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", nargs="+", default=["llama", "qwen2", "mistral", "gpt2"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--hidden", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--smoke", action="store_true", help="llama, float32, hidden 64")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.smoke:
        args.archs, args.dtypes, args.hidden = ["llama"], ["float32"], [64]
    transformers.logging.set_verbosity_error()
    runs = [{"arch": arch, "dtype": dtype, "hidden": hidden, **measure(arch, getattr(torch, dtype), hidden)}
            for hidden in args.hidden for dtype in args.dtypes for arch in args.archs]
    publish(args.out, {"bfloat16_gemm": pf.batch_invariant_bfloat16_gemm(), "threads": torch.get_num_threads(),
                       "runs": runs}, render)


def render(doc):
    def cell(d):
        return f"{d['logit']:.2g} / {d['logp']:.2g} / {100 * d['unequal']:.1f}%"

    lines = ["# The mismatch batch_invariant() removes (CPU)", "",
             f"One 11-token sequence alone against the same sequence in shuffled, left-padded batches of 3, 5 "
             f"and 8 ({', '.join(BATCHES)}; the largest of the three) and decoded one token at a time with the "
             f"KV cache. Random 2-layer models, 4 query heads over 2 key heads, vocabulary {VOCABULARY}; "
             f"{doc['threads']} torch threads; the mode's bfloat16 GEMM: {doc['bfloat16_gemm']}. Each cell: max "
             f"|Δlogit| / max |Δlogp| of the sequence's tokens / share of logits whose bits differ.", "",
             "| model | dtype | hidden | mode off: in a batch | mode off: decoded | mode on: in a batch | "
             "mode on: decoded |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in doc["runs"]:
        lines.append(f"| {run['arch']} | {run['dtype']} | {run['hidden']} | {cell(run['off']['in a batch'])} | "
                     f"{cell(run['off']['decoded'])} | {cell(run['on']['in a batch'])} | {cell(run['on']['decoded'])} |")
    return lines


if __name__ == "__main__":
    main()
