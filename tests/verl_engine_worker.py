"""verl issue #6280 through verl 0.9.1's own FSDP engine, on the CPU in one process: the log-probs
of the same sequences computed by ``compute_log_prob``'s path (``infer_batch``, at one micro-batch
size) and by the update's path (``forward_backward_batch``, at another), with ppo_fast installed
into verl, first without and then with ``install(batch_invariant=True)``.

    python tests/verl_engine_worker.py --remove-padding 1   # prints one JSON line

verl 0.9.1 has no CPU platform (its device falls back to CUDA), so a minimal one is set here; the
engine is verl's ``FSDPEngineWithLMHead`` with the fsdp2 strategy (FSDP1 refuses CPU parameters)
and float32 end to end. Used by tests/integrations/test_verl_batch_invariant.py.
"""

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.simplefilter("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

platform = peers.verl("plugin.platform")
PlatformCUDA = peers.verl("plugin.platform.platform_cuda").PlatformCUDA


class CPUPlatform(PlatformCUDA):
    """verl's device calls, answered for the CPU (gloo for collectives)."""

    device_name = property(lambda self: "cpu")
    vendor_name = property(lambda self: "cpu")
    device_module = property(lambda self: torch.cpu)

    def is_available(self):
        return True

    def is_platform_available(self, use_smi_check=False):
        return True

    def current_device(self):
        return "cpu"

    def device_count(self):
        return 1

    def set_device(self, index):
        pass

    def synchronize(self, index=None):
        pass

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        pass

    def set_allocator_settings(self, settings):
        pass

    def empty_cache(self):
        pass

    def get_device_capability(self, index=0):
        return (None, None)

    def communication_backend_name(self):
        return "gloo"


LENGTHS = [9, 13, 6, 11, 8, 12, 7, 10]


def build_engine(remove_padding: bool, model_dir: str):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0,
                                      architectures=["LlamaForCausalLM"])
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    workers_config = peers.verl("workers.config")
    # verl's monkey patch imports a TRL class that TRL 1.16 no longer has; the patch is for value heads.
    peers.verl("models.transformers.monkey_patch").is_trl_available = lambda: False
    engine = peers.verl("workers.engine.fsdp.transformer_impl").FSDPEngineWithLMHead(
        workers_config.HFModelConfig(path=model_dir, load_tokenizer=False, use_remove_padding=remove_padding,
                                     enable_gradient_checkpointing=False,
                                     override_config={"attn_implementation": "sdpa"}),
        workers_config.FSDPEngineConfig(strategy="fsdp2", forward_only=False, model_dtype="fp32",
                                        mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32",
                                                         "buffer_dtype": "fp32"},
                                        use_torch_compile=False, use_dynamic_bsz=False, micro_batch_size_per_gpu=1,
                                        use_remove_padding=remove_padding),
        workers_config.FSDPOptimizerConfig(lr=1e-5, total_training_steps=1),
        peers.verl("trainer.config").CheckpointConfig())
    engine.initialize()
    return engine


def batch(micro_batch_size: int, remove_padding: bool):
    """A fresh TensorDict each call (the engine mutates what it is given)."""
    from tensordict import TensorDict

    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 256, (n,), generator=g) for n in LENGTHS]

    def nested(tensors):
        return torch.nested.as_nested_tensor(tensors, layout=torch.jagged)

    data = TensorDict({"input_ids": nested(seqs), "position_ids": nested([torch.arange(n) for n in LENGTHS]),
                       "loss_mask": nested([torch.ones(n, dtype=torch.long) for n in LENGTHS])},
                      batch_size=[len(LENGTHS)])
    peers.verl("utils.tensordict_utils").assign_non_tensor(
        data, use_remove_padding=remove_padding, use_dynamic_bsz=False, micro_batch_size_per_gpu=micro_batch_size,
        temperature=1.0, calculate_entropy=True, use_fused_kernels=False)
    return data


def per_sequence(log_probs):
    # Each sequence's last position is labelled with the next sequence's first token (verl rolls the
    # packed ids), a position verl's response mask never keeps: dropped.
    return [row[:-1] for row in log_probs.unbind()]


def old_log_prob(engine, micro_batch_size, remove_padding):
    """compute_log_prob's path: infer_batch at log_prob_micro_batch_size_per_gpu."""
    with engine.eval_mode():
        out = engine.infer_batch(batch(micro_batch_size, remove_padding))
    return per_sequence(out["model_output"]["log_probs"])


def update_log_prob(engine, micro_batch_size, remove_padding):
    """update_actor's path: forward_backward_batch at ppo_micro_batch_size_per_gpu."""
    data = batch(micro_batch_size, remove_padding)
    peers.verl("utils.tensordict_utils").assign_non_tensor(data, return_model_output=True)

    def loss(model_output, data, dp_group):
        return model_output["log_probs"].values().sum(), {}

    with engine.train_mode():
        out = engine.forward_backward_batch(data, loss, forward_only=False)
    return per_sequence(out["model_output"]["log_probs"])


def compare(a, b):
    return {"max_abs_diff": max((x - y).abs().max().item() for x, y in zip(a, b)),
            "equal": all(torch.equal(x, y) for x, y in zip(a, b))}


def measure(engine, remove_padding):
    return {
        "old_log_prob micro-batch 1 vs 4": compare(old_log_prob(engine, 1, remove_padding),
                                                   old_log_prob(engine, 4, remove_padding)),
        "old_log_prob at 4 vs update log_prob at 2": compare(old_log_prob(engine, 4, remove_padding),
                                                             update_log_prob(engine, 2, remove_padding)),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--remove-padding", type=int, choices=(0, 1), required=True)
    args = parser.parse_args()
    remove_padding = bool(args.remove_padding)
    import ppo_fast.integrations.verl as pf_verl

    platform.set_platform(CPUPlatform())
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        try:
            pf_verl.install()
            engine = build_engine(remove_padding, f"{tmp}/model")
            result = {"off": measure(engine, remove_padding)}
            report = pf_verl.install(batch_invariant=True)
            result["on"] = measure(engine, remove_padding)
            result["report"] = {k: v for k, v in report.items() if "forward_step" in k}
            pf_verl.uninstall()
            result["after uninstall"] = measure(engine, remove_padding)
        finally:
            dist.destroy_process_group()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
