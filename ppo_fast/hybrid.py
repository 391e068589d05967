"""HybridEngine: one DeepSpeed policy that trains under ZeRO and generates fast.

    engine, *_ = deepspeed.initialize(model=policy, config=ds_config, ...)
    hybrid = pf.HybridEngine(engine, tokenizer, max_new_tokens=128)
    out = hybrid.generate(prompt_ids, attention_mask=prompt_mask)   # then train with `engine`

Switching into inference mode (``generate`` does it; ``with hybrid.inference_mode():`` holds it
across several calls of one rollout):

* eval mode, gradient checkpointing off, KV cache on; all restored exactly afterwards, also when
  generation raises;
* under ZeRO-3 the partitioned parameters are gathered **once** per rollout, and DeepSpeed's
  per-module fetch hooks are taken off so no forward gathers anything. When ``max_gathered_bytes``
  says the whole model does not fit, the parameters outside the repeated decoder blocks and as many
  blocks as fit are gathered once; every other block is gathered around its own forward and
  released after it. Everything is re-partitioned on exit, so training memory returns to what it
  was. In that bucketed mode forwards are collective, so ranks that finish early keep stepping
  until every rank is done;
* decoding runs our own loop over a preallocated (static) KV cache where the model supports one —
  per step only the model's forward and sampling — and Hugging Face ``generate`` otherwise
  (``metrics["decode"]`` says which);
* PEFT LoRA adapters are merged into the base weights for generation and the saved base weights
  put back afterwards, bit for bit.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .functional import token_logprobs
from .sequences import accepts_keyword, completion_mask, position_ids

SUPPORTED_GENERATION_KWARGS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                               "pad_token_id", "eos_token_id")
DECODE_MODES = ("auto", "static", "hf")


@dataclass
class GenerationOutput:
    """Prompts followed by completions, ready for log-prob scoring.

    sequences ``[B, P + N]`` (completions padded with ``pad_token_id`` after EOS);
    attention_mask ``[B, P + N]`` (the prompt's mask, then 1 up to and including EOS);
    completion_mask ``[B, P + N]`` (1 on generated tokens up to and including EOS);
    logprobs ``[B, N]`` float32: each generated token's log-prob under ``softmax(logits /
    temperature)``, from the very logits it was sampled from (before top-k/top-p, which only
    restrict where sampling looks: the distribution a trainer scores is the full one), computed
    by ``pf.token_logprobs``; 0 after EOS;
    ``prompt_length`` = P; ``metrics``: gather_seconds, generate_seconds, new_tokens,
    tokens_per_second, peak_memory_bytes (CUDA only), decode ("static" or "hf"), gathered
    ("replicated", "all" or "buckets").
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    prompt_length: int
    metrics: dict = field(default_factory=dict)

    @property
    def completions(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]


def _sampled_logprob(logits: torch.Tensor, tokens: torch.Tensor, options: dict) -> torch.Tensor:
    """``[B]`` log-probs of ``tokens`` under ``softmax(logits / temperature)``: the rollout's own
    numbers, for a trainer to compare with (or use as) its old log-probs."""
    return token_logprobs(logits, tokens, temperature=options["temperature"]).float()


def pick_attn_implementation(dtype: torch.dtype, device: torch.device | str) -> str:
    """flash_attention_2 where flash-attn is importable and the model runs fp16/bf16 on CUDA,
    sdpa otherwise. flash-attn is never required."""
    import importlib.util

    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and dtype in (torch.float16, torch.bfloat16) and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def check_generation_kwargs(kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - set(SUPPORTED_GENERATION_KWARGS))
    if unknown:
        raise ValueError(f"unsupported generation keyword(s) {unknown}; HybridEngine.generate takes "
                         f"{', '.join(SUPPORTED_GENERATION_KWARGS)}")
    if "max_new_tokens" in kwargs and not (isinstance(kwargs["max_new_tokens"], int)
                                           and kwargs["max_new_tokens"] >= 1):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {kwargs['max_new_tokens']!r}")
    if "temperature" in kwargs and not kwargs["temperature"] > 0:
        raise ValueError(f"temperature must be > 0, got {kwargs['temperature']!r}")
    if "top_p" in kwargs and not 0 < kwargs["top_p"] <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {kwargs['top_p']!r}")
    if "top_k" in kwargs and not (isinstance(kwargs["top_k"], int) and kwargs["top_k"] >= 0):
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {kwargs['top_k']!r}")


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_adapter")


def _decoder_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's repeated blocks: the ModuleList holding the most parameters."""
    best, best_numel = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            numel = sum(_numel(p) for p in module.parameters())
            if numel > best_numel:
                best, best_numel = module, numel
    return best


def _numel(param: torch.Tensor) -> int:
    return getattr(param, "ds_numel", param.numel())


def _bytes(params) -> int:
    return sum(_numel(p) * p.element_size() for p in params)


class HybridEngine:
    """Wraps a DeepSpeed engine (ZeRO stage 0-3, offload included) for fast rollouts.

    Args:
        engine: the ``deepspeed.DeepSpeedEngine`` that trains the policy.
        tokenizer: optional; supplies ``pad_token_id`` / ``eos_token_id`` defaults.
        max_gathered_bytes: ZeRO-3 only. ``None`` gathers the whole model for the rollout; a
            smaller budget gathers whole decoder blocks up to it and the rest block by block.
        decode: ``"auto"`` (our static-cache loop where supported, else HF ``generate``),
            ``"static"`` (require it) or ``"hf"``.
        merge_lora: for a PEFT model, merge the LoRA adapters into the (gathered) base weights for
            generation and put the saved base weights back afterwards, bit for bit; ``False``
            generates through the unmerged adapters (no weight copy, slower decoding).
        **generation_defaults: defaults for :meth:`generate` (any of
            ``SUPPORTED_GENERATION_KWARGS``).
    """

    def __init__(self, engine, tokenizer=None, *, max_gathered_bytes: int | None = None,
                 decode: str = "auto", merge_lora: bool = True, **generation_defaults):
        self.engine = engine
        self.model: nn.Module = getattr(engine, "module", engine)
        config = getattr(self.model, "config", None)
        if config is None or not hasattr(self.model, "generate"):
            raise TypeError(f"HybridEngine needs a Hugging Face causal LM (a model with .config and "
                            f".generate); got {type(self.model).__name__}")
        if getattr(config, "is_encoder_decoder", False):
            raise TypeError(f"HybridEngine needs a decoder-only causal LM; "
                            f"{type(self.model).__name__} is an encoder-decoder model")
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        if max_gathered_bytes is not None and max_gathered_bytes <= 0:
            raise ValueError(f"max_gathered_bytes must be > 0 or None, got {max_gathered_bytes!r}")
        check_generation_kwargs(generation_defaults)
        self.decode = decode
        self.max_gathered_bytes = max_gathered_bytes
        self.merge_lora = merge_lora and _is_peft(self.model)
        generation_config = getattr(self.model, "generation_config", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(generation_config, "eos_token_id", None) or getattr(config, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(generation_config, "pad_token_id", None) or getattr(config, "pad_token_id", None)
        self.generation_defaults = {"max_new_tokens": 32, "do_sample": False, "temperature": 1.0,
                                    "top_p": 1.0, "top_k": 0, "eos_token_id": eos,
                                    "pad_token_id": pad if pad is not None else eos,
                                    **generation_defaults}
        self._depth = 0
        self._gather_mode = "replicated"
        self._gather_seconds = 0.0

    # ----------------------------------------------------------------------------------------
    # Mode switching
    # ----------------------------------------------------------------------------------------

    @property
    def zero_stage(self) -> int:
        stage = getattr(self.engine, "zero_optimization_stage", None)
        return int(stage()) if callable(stage) else 0

    @contextmanager
    def inference_mode(self):
        """Eval mode, no gradient checkpointing, KV cache on and (ZeRO-3) parameters gathered, for
        every ``generate`` inside; everything restored on exit, exception or not."""
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        model = self.model
        was_training = model.training
        checkpointing = [(m, m.gradient_checkpointing) for m in model.modules()
                         if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
        use_cache = getattr(model.config, "use_cache", None)
        try:
            model.eval()
            for module, _ in checkpointing:
                module.gradient_checkpointing = False
            model.config.use_cache = True
            with ExitStack() as stack:
                start = time.perf_counter()
                self._gather_mode = stack.enter_context(self._gathered())
                if self.merge_lora:
                    stack.enter_context(self._merged_adapters())
                self._gather_seconds = time.perf_counter() - start
                self._depth = 1
                try:
                    yield self
                finally:
                    self._depth = 0
        finally:
            model.train(was_training)
            for module, flag in checkpointing:
                module.gradient_checkpointing = flag
            model.config.use_cache = use_cache

    @contextmanager
    def _merged_adapters(self):
        """LoRA merged into the base weights for decoding speed. Unmerging by subtraction would
        drift by rounding every rollout, so the base weights are saved and restored instead."""
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        if any(layer.merged_adapters for layer in layers):
            raise RuntimeError("the PEFT model already has merged adapters; HybridEngine merges "
                               "and restores them itself (unmerge them first)")
        saved = [(layer, layer.base_layer.weight.detach().clone(),
                  None if getattr(layer.base_layer, "bias", None) is None
                  else layer.base_layer.bias.detach().clone()) for layer in layers]
        self.model.merge_adapter()
        try:
            yield
        finally:
            with torch.no_grad():
                for layer, weight, bias in saved:
                    layer.base_layer.weight.copy_(weight)
                    if bias is not None:
                        layer.base_layer.bias.copy_(bias)
                    layer.merged_adapters.clear()

    def _param_offload(self):
        optimizer = getattr(self.engine, "optimizer", None)
        offload = getattr(optimizer, "parameter_offload", None)
        if offload is None:
            offload = getattr(self.engine, "parameter_offload", None) or optimizer
        if offload is None or not hasattr(offload, "forward_hooks"):
            raise RuntimeError("could not find DeepSpeed's ZeRO-3 parameter offload hooks on this "
                               f"engine (deepspeed version changed?): {type(self.engine).__name__}")
        return offload

    @contextmanager
    def _gathered(self):
        if self.zero_stage != 3:
            yield "replicated"
            return
        import deepspeed

        params = list(self.model.parameters())
        budget = self.max_gathered_bytes
        offload = self._param_offload()
        if budget is None or _bytes(params) <= budget:
            resident, streamed = params, []
        else:
            resident, streamed = self._plan_buckets(budget)
        with deepspeed.zero.GatheredParameters(resident):
            for p in params:
                p.ds_active_sub_modules.clear()
            # DeepSpeed's hooks would release the gathered weights after each module's forward
            # and fetch them again for the next token; ours stream only the non-resident blocks.
            hooks = []
            for hook in offload.forward_hooks + offload.backward_hooks:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                for block in streamed:
                    hooks += self._stream_block(block)
                yield "all" if not streamed else "buckets"
            finally:
                for hook in hooks:
                    hook.remove()
                offload._register_deepspeed_module(offload.module)

    def _plan_buckets(self, budget: int):
        blocks = _decoder_blocks(self.model)
        if blocks is None:
            raise ValueError("max_gathered_bytes is below the model's size, but the model has no "
                             "repeated blocks (nn.ModuleList) to stream one at a time")
        in_blocks = {id(p) for p in blocks.parameters()}
        resident = [p for p in self.model.parameters() if id(p) not in in_blocks]
        used = _bytes(resident)
        streamed = []
        for block in blocks:
            size = _bytes(block.parameters())
            if not streamed and used + size <= budget:
                resident += list(block.parameters())
                used += size
            else:
                streamed.append(block)
        return resident, streamed

    @staticmethod
    def _stream_block(block: nn.Module):
        import deepspeed

        params = list(block.parameters())
        state = {}

        def gather(module, args):
            state["ctx"] = deepspeed.zero.GatheredParameters(params)
            state["ctx"].__enter__()

        def release(module, args, output):
            state.pop("ctx").__exit__(None, None, None)

        return [block.register_forward_pre_hook(gather), block.register_forward_hook(release)]

    # ----------------------------------------------------------------------------------------
    # Generation
    # ----------------------------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **gen_kwargs) -> GenerationOutput:
        """Generate completions for left-padded prompts ``input_ids [B, P]``.

        Takes ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``top_k``,
        ``pad_token_id``, ``eos_token_id`` (an int or a list); defaults from the constructor.
        """
        check_generation_kwargs(gen_kwargs)
        options = {**self.generation_defaults, **gen_kwargs}
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be an integer tensor [B, P], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have shape {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        if attention_mask.shape[1] and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("prompts must be left-padded: attention_mask[:, -1] must be 1 for every row")
        if options["pad_token_id"] is None:
            raise ValueError("pad_token_id is unknown: pass pad_token_id= or a tokenizer that has one")
        eos = options["eos_token_id"]
        options["eos_token_id"] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        context = getattr(self.model.config, "max_position_embeddings", None)
        total = input_ids.shape[1] + options["max_new_tokens"]
        if context is not None and total > context:
            raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens "
                             f"{options['max_new_tokens']} = {total} exceeds the model's context of "
                             f"{context} tokens (config.max_position_embeddings)")
        device = next(self.model.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        with self.inference_mode(), torch.no_grad():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synced = self._gather_mode == "buckets" and torch.distributed.is_initialized()
            start = time.perf_counter()
            use_static = self.decode == "static" or (self.decode == "auto" and self._supports_static())
            if use_static:
                completions, logprobs = self._static_decode(input_ids, attention_mask, options, synced)
            else:
                completions, logprobs = self._hf_generate(input_ids, attention_mask, options, synced)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
        until_eos = completion_mask(completions, options["eos_token_id"])
        completions = completions.masked_fill(until_eos == 0, options["pad_token_id"])
        logprobs = torch.where(until_eos.bool(), logprobs, 0.0)
        new_tokens = int(until_eos.sum())
        metrics = {
            "gather_seconds": self._gather_seconds,
            "generate_seconds": seconds,
            "new_tokens": new_tokens,
            "tokens_per_second": new_tokens / seconds if seconds > 0 else float("inf"),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "decode": "static" if use_static else "hf",
            "gathered": self._gather_mode,
        }
        prompt_len = input_ids.shape[1]
        zeros = torch.zeros_like(attention_mask)
        return GenerationOutput(
            sequences=torch.cat([input_ids, completions], dim=1),
            attention_mask=torch.cat([attention_mask, until_eos], dim=1),
            completion_mask=torch.cat([zeros, until_eos], dim=1),
            logprobs=logprobs,
            prompt_length=prompt_len,
            metrics=metrics,
        )

    def _decoder(self) -> nn.Module:
        """The model that decodes: a PeftModel forwards **kwargs, so its base model (with the
        adapters injected) is the one whose signature says what it accepts."""
        return self.model.get_base_model() if _is_peft(self.model) else self.model

    def _supports_static(self) -> bool:
        return bool(getattr(self._decoder(), "_can_compile_fullgraph", False))

    def _hf_generate(self, input_ids, attention_mask, options, synced):
        kwargs = dict(max_new_tokens=options["max_new_tokens"], do_sample=options["do_sample"],
                      pad_token_id=options["pad_token_id"],
                      eos_token_id=options["eos_token_id"] or None, use_cache=True,
                      synced_gpus=synced, return_dict_in_generate=True, output_logits=True)
        if options["do_sample"]:
            kwargs.update(temperature=options["temperature"], top_p=options["top_p"],
                          top_k=options["top_k"])
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        completions = out.sequences[:, input_ids.shape[1]:]
        # output_logits are the model's raw logits, before Hugging Face's temperature and filters.
        logprobs = [_sampled_logprob(logits, completions[:, step], options)
                    for step, logits in enumerate(out.logits)]
        return completions, torch.stack(logprobs, dim=1)

    def _static_decode(self, input_ids, attention_mask, options, synced):
        """Prefill, then one forward per token over a preallocated KV cache."""
        from transformers import StaticCache

        model = self._decoder()
        B, P = input_ids.shape
        max_new = options["max_new_tokens"]
        cache = StaticCache(config=model.config, max_cache_len=P + max_new)
        keep_last = {"logits_to_keep": 1} if accepts_keyword(model, "logits_to_keep") else {}
        # transformers renamed past_key_values to cache (5.2x); take whichever this one has.
        cache_arg = "cache" if accepts_keyword(model, "cache") else "past_key_values"
        mask = torch.ones(B, P + max_new, dtype=attention_mask.dtype, device=input_ids.device)
        mask[:, :P] = attention_mask
        positions = position_ids(attention_mask)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                       cache_position=torch.arange(P, device=input_ids.device), use_cache=True,
                       **{cache_arg: cache}, **keep_last).logits[:, -1]
        next_position = positions[:, -1:] + 1
        eos = torch.tensor(options["eos_token_id"], dtype=torch.long, device=input_ids.device)
        tokens = torch.full((B, max_new), options["pad_token_id"], dtype=torch.long, device=input_ids.device)
        logprobs = torch.zeros(B, max_new, dtype=torch.float32, device=input_ids.device)
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        steps = 0
        for step in range(max_new):
            token = self._sample(logits, options)
            token = torch.where(finished, torch.full_like(token, options["pad_token_id"]), token)
            tokens[:, step] = token
            logprobs[:, step] = _sampled_logprob(logits, token, options)
            steps = step + 1
            if eos.numel():
                finished |= torch.isin(token, eos)
            if steps == max_new or self._all_finished(finished, synced):
                break
            cache_position = torch.tensor([P + step], device=input_ids.device)
            logits = model(input_ids=token[:, None], attention_mask=mask[:, :P + step + 1],
                           position_ids=next_position, cache_position=cache_position,
                           use_cache=True, **{cache_arg: cache}).logits[:, -1]
            next_position = next_position + 1
        return tokens[:, :steps], logprobs[:, :steps]

    @staticmethod
    def _all_finished(finished: torch.Tensor, synced: bool) -> bool:
        """Local stop test; in bucketed mode every rank steps until all ranks are done, since each
        forward is collective."""
        if not synced:
            return bool(finished.all())
        flag = torch.tensor([0.0 if bool(finished.all()) else 1.0], device=finished.device)
        torch.distributed.all_reduce(flag)
        return flag.item() == 0

    @staticmethod
    def _sample(logits: torch.Tensor, options: dict) -> torch.Tensor:
        """Greedy, or temperature → top-k → top-p sampling (the order of Hugging Face's warpers)."""
        if not options["do_sample"]:
            return logits.argmax(-1)
        scores = logits.float() / options["temperature"]
        top_k = options["top_k"]
        if top_k and top_k < scores.shape[-1]:
            kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        top_p = options["top_p"]
        if top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop_sorted = cumulative <= 1 - top_p
            drop_sorted[..., -1] = False
            scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        return torch.multinomial(scores.softmax(-1), 1).squeeze(-1)
