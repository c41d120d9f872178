"""axolotl plugin: ``plugins: [fastadapt.integrations.axolotl.FastAdaptPlugin]`` and ``fastadapt: true``
in an axolotl config patch the PEFT model axolotl builds onto the fused ops (``fastadapt_strict: true``:
``fastadapt.patch(model, strict=True)``, a call that falls back raises).

axolotl's own LoRA kernels (``lora_mlp_kernel``, ``lora_qkv_kernel``, ``lora_o_kernel``,
``lora_embedding_kernel``; switched on by default for LoRA / QLoRA) replace the attention and MLP
forwards with ones that bypass the LoRA layers' forward, so they would silently take the patched
layers out of the model: the plugin switches those left unset off before axolotl's validation
turns them on, and refuses a config that asks for both. It also refuses configs with nothing it
could serve (no ``adapter: lora`` / ``qlora``, 8-bit LoRA).
"""

from __future__ import annotations

import logging

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel

from fastadapt.integrations import PatchReport, patch

LOG = logging.getLogger(__name__)

KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")


class FastAdaptArgs(BaseModel):
    """The plugin's config keys."""

    fastadapt: bool | None = None
    fastadapt_strict: bool | None = None


def _refusals(cfg) -> list[str]:
    reasons = []
    if cfg.get("adapter") not in ("lora", "qlora"):
        reasons.append(f"adapter: {cfg.get('adapter')} (fastadapt serves adapter: lora or qlora)")
    elif cfg.get("adapter") == "lora" and cfg.get("load_in_8bit"):
        reasons.append("load_in_8bit LoRA (bitsandbytes 8-bit layers are not served; use qlora or a bf16 base)")
    asked = [k for k in KERNELS if cfg.get(k)]
    if asked:
        reasons.append(f"{', '.join(asked)}: true (axolotl's LoRA kernels replace the forwards fastadapt patches; "
                       "set them to false or leave them unset)")
    return reasons


class FastAdaptPlugin(BasePlugin):
    """Patches the model in ``post_lora_load``; ``report`` is the :class:`~fastadapt.PatchReport`."""

    def __init__(self):
        super().__init__()
        self.report: PatchReport | None = None
        self._switched_off: list[str] = []

    def get_input_args(self) -> str:
        return "fastadapt.integrations.axolotl.FastAdaptArgs"

    def register(self, cfg: dict):
        # The unparsed config, before axolotl's validation auto-enables its LoRA kernels for any unset.
        if not cfg.get("fastadapt"):
            return
        reasons = _refusals(cfg)
        if reasons:
            raise ValueError("fastadapt: true cannot be served with " + "; ".join(reasons))
        self._switched_off = [k for k in KERNELS if cfg.get(k) is None]
        for key in self._switched_off:
            cfg[key] = False
        if self._switched_off:
            LOG.warning("fastadapt: switched off axolotl's %s (they replace the LoRA forwards fastadapt patches)",
                        ", ".join(self._switched_off))

    def on_config_validation_error(self, cfg: dict):
        for key in self._switched_off:
            cfg.pop(key, None)
        self._switched_off = []

    def post_lora_load(self, cfg, model):
        if not cfg.get("fastadapt"):
            return
        asked = [k for k in KERNELS if cfg.get(k)]
        if asked:  # turned on after register (another plugin): they would bypass the patched layers
            raise ValueError(f"fastadapt: {', '.join(asked)} were switched on after the config was validated; "
                             "axolotl's LoRA kernels replace the forwards fastadapt patches")
        self.report = patch(model, strict=bool(cfg.get("fastadapt_strict")))
        LOG.info(str(self.report).splitlines()[0])
