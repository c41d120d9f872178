"""Injectors: put fastadapt's own adapter modules into a Hugging Face model, without PEFT or AdapterHub
(``bottleneck``: ``add_adapter`` and its save / load / switch / remove; ``llama_adapter``:
``add_adaption_prompt``). The integrations (``fastadapt.patch``) use their public functions only."""
