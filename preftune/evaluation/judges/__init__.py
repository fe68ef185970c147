"""Judges: decide which of two replies to a prompt is better. ``base`` is the interface, one module per kind
(``python``, ``reward_model``, ``openai``), and ``registry.make_judge`` builds one from its spec string."""
