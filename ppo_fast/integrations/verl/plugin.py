"""verl's plugin hook (entry point ``verl.plugins``): verl imports this module at ``import verl``
in the driver and in every Ray worker. With ``PPO_FAST_VERL=1`` it runs
:func:`ppo_fast.integrations.verl.install`, with ``batch_invariant=True`` when
``PPO_FAST_VERL_BATCH_INVARIANT=1`` too; otherwise it does nothing, so installing ppo_fast never
changes verl by itself.

verl swallows a failing plugin at debug level; a failure here is logged as an error and warned
about, so a run cannot silently go on without ppo_fast when it was asked for.
"""

import logging
import os
import warnings

ENV_VAR = "PPO_FAST_VERL"
BATCH_INVARIANT_ENV_VAR = "PPO_FAST_VERL_BATCH_INVARIANT"

if os.environ.get(BATCH_INVARIANT_ENV_VAR, "").strip() == "1" and os.environ.get(ENV_VAR, "").strip() != "1":
    message = f"{BATCH_INVARIANT_ENV_VAR}=1 does nothing without {ENV_VAR}=1 (set both)"
    logging.getLogger("ppo_fast").error(message)
    warnings.warn(message, RuntimeWarning, stacklevel=1)

if os.environ.get(ENV_VAR, "").strip() == "1":
    try:
        from . import install

        install(batch_invariant=os.environ.get(BATCH_INVARIANT_ENV_VAR, "").strip() == "1")
    except Exception as error:
        message = f"{ENV_VAR}=1 but ppo_fast could not install into verl: {type(error).__name__}: {error}"
        logging.getLogger("ppo_fast").error(message)
        warnings.warn(message, RuntimeWarning, stacklevel=1)
        raise
