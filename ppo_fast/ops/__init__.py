"""The ops with a ``torch.library`` schema, one module each, so autograd, device dispatch and
``torch.compile`` see each as one ordinary op. Each module holds, top to bottom, its schema, fake
kernel, autograd formula and its implementations per backend, entered in
:data:`ppo_fast.dispatch.TABLE`:

* :mod:`.token_logprobs`   logits → (logp, entropy, lse, Σ p²), and the row backward
* :mod:`.ppo_loss`         the PPO actor loss per token from logits
* :mod:`.gae`              GAE over packed sequences
* :mod:`.linear_logprobs`  the fused linear head: log-probs from hidden states and the lm_head
"""

from . import gae, linear_logprobs, ppo_loss, token_logprobs

__all__ = ["gae", "linear_logprobs", "ppo_loss", "token_logprobs"]
