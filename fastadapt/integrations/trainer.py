"""``fastadapt.FastAdaptCallback``: the HF ``Trainer`` (and TRL's trainers, which subclass it) patch
their model onto the fused ops by themselves.

``Trainer(..., callbacks=[fastadapt.FastAdaptCallback()])`` is the same as calling
``fastadapt.patch(trainer.model)`` after building the trainer: ``on_init_end`` runs at the end of
``Trainer.__init__``, after TRL's trainers have wrapped the model with PEFT (``peft_config=``) and
before accelerate prepares it in ``train()``. Patching only rebinds adapter modules' ``forward``, so
the wrappers accelerate adds later (DDP, FSDP, autocast, ``torch.compile``) run the patched modules.
"""

from __future__ import annotations

import logging

import transformers

from fastadapt.integrations import PatchReport, patch

logger = logging.getLogger(__name__)


class FastAdaptCallback(transformers.TrainerCallback):
    """Patch the model the Trainer holds (``fastadapt.patch(model, strict, **patch_options)``).

    ``report``: the :class:`~fastadapt.PatchReport` (None until the Trainer is built). At
    ``on_train_begin`` the model is walked again and whatever is not patched (a model replaced
    since, adapters injected or added since) is patched into the same report. Each ``on_log`` adds
    ``fastadapt/fused`` and ``fastadapt/fallback`` (calls since patching) to the logs, as seen by the
    callbacks after this one and in ``state.log_history``.
    """

    def __init__(self, strict: bool = False, **patch_options):
        self.strict = strict
        self.patch_options = patch_options
        self.report: PatchReport | None = None
        self._model = None

    def _patch(self, model) -> None:
        first = self.report is None
        if first:
            self.report = PatchReport(strict=self.strict)
        report = self.report
        n_patched, skipped = len(report.patched), list(report.skipped)
        patch(model, report=report, **self.patch_options)
        # A second walk lists every module it patched before as "already patched" and again what it
        # left alone: keep only what is new.
        report.skipped = skipped + [s for s in report.skipped[len(skipped):]
                                    if s[1] != "already patched" and s not in skipped]
        new = len(report.patched) - n_patched
        if first:
            logger.info(str(report).splitlines()[0])
        elif new or model is not self._model:
            logger.info("fastadapt: the Trainer's model changed since it was patched: patched %d more module(s)", new)
        self._model = model

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._patch(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._patch(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.report is None or logs is None:
            return
        counts = {"fastadapt/fused": self.report.calls["fused"],
                  "fastadapt/fallback": sum(n for key, n in self.report.calls.items() if key != "fused")}
        logs.update(counts)
        # The Trainer appended a copy of these logs to the history just before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(counts)
