"""Drop-in adapters with the peer projects' own signatures: ``ppo_fast.integrations.verl``,
``.openrlhf`` and ``.trl``. Each imports its peer lazily, only where the peer's own types are
needed; ``import ppo_fast`` never imports a peer."""
