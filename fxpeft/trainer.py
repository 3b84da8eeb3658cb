"""Training a rewritten graph under ``transformers.Trainer``, with PEFT-format adapter checkpoints.

A graph traced with the keywords Trainer's batches carry (``input_ids``, ``attention_mask``, ``labels``) returns
the model's own output, ``.loss`` included, so ``transformers.Trainer`` trains it as it is. What Trainer cannot do
by itself is checkpoint it well: it only knows ``PreTrainedModel`` and ``PeftModel``, so for any other module it
writes the whole state dict (the frozen base weights too) and resumes by loading it back.

:class:`FxPeftTrainer` (a ``Trainer`` subclass) and :class:`FxPeftTrainerMixin` (the same overrides, to put in front
of another ``Trainer`` subclass) write each checkpoint and :meth:`~transformers.Trainer.save_model` as the PEFT
adapter directory (:func:`fxpeft.save_adapter`: ``adapter_config.json`` + ``adapter_model.safetensors``), as Trainer
does for a ``PeftModel``, and ``train(resume_from_checkpoint=...)`` copies the adapter weights back into the graph's
own parameters (:func:`restore_adapters`); Trainer restores the optimizer, scheduler and RNG states as usual, so the
resumed run continues the same loss curve.

Why a subclass and not a ``TrainerCallback``: a callback runs *after* Trainer has written ``model.safetensors`` (it
could only delete it again) and has no hook at all on the resume path: Trainer loads the checkpoint in
``_load_from_checkpoint`` before any callback event, and for a module that is not a ``PeftModel`` it would look for
the full state dict there. ``_save``, ``_load_from_checkpoint`` and ``_load_best_model`` are the methods Trainer
itself routes every model write and read through (checkpoints, ``save_model``, ``load_best_model_at_end``), so
overriding those three keeps every other Trainer path (DDP under ``torchrun``/``accelerate launch``, optimizer and
RNG state, ``save_total_limit``, ``get_last_checkpoint``) as it is.

Layout: a graph with one adapter writes it at the checkpoint's root; with several, ``"default"`` (if there is one)
goes to the root and every other adapter to a subdirectory named after it, PEFT's multi-adapter layout.

Refused with a :class:`~fxpeft.ConfigError` when the trainer is built (a graph has no such hooks): DeepSpeed and
FSDP (their checkpoints bypass ``_save``), ``activation_checkpointing`` (``gradient_checkpointing``) and
``neftune_noise_alpha``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import fx, nn

from .copies import FullCopy
from .errors import AdapterFileError, ConfigError
from .io import load_adapter, save_adapter
from .lifecycle import active_adapters, adapter_names, delete_adapter, set_adapter
from .registry import AdapterModule

__all__ = ["FxPeftTrainer", "FxPeftTrainerMixin", "save_adapters", "restore_adapters"]

_CONFIG, _WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_SCRATCH = "fxpeft_resume_scratch"  # the temporary adapter restore_adapters reads a directory into


def _layout(gm: fx.GraphModule) -> dict[str, str]:
    """adapter name -> its directory relative to the checkpoint ("" = the root), PEFT's multi-adapter layout."""
    names = adapter_names(gm)
    if len(names) == 1:
        return {names[0]: ""}
    return {n: "" if n == "default" else n for n in names}


def save_adapters(gm: fx.GraphModule, directory: str | os.PathLike) -> None:
    """Write every adapter of ``gm`` in PEFT's layout: one adapter (or ``"default"``) at ``directory``'s root, the
    others in subdirectories named after them (what ``PeftModel.save_pretrained`` writes for several adapters).

    Raises:
        AdapterFileError: ``gm`` holds no adapter, or one cannot be written (:func:`fxpeft.save_adapter`).
    """
    layout = _layout(gm)
    if not layout:
        raise AdapterFileError("the graph holds no adapter to save; rewrite it first (fxpeft.rewrite)")
    for name, sub in layout.items():
        save_adapter(gm, os.path.join(directory, sub) if sub else directory, name)


def _slots(gm: fx.GraphModule, adapter_name: str) -> dict[tuple, AdapterModule]:
    # an adapter module's place, independent of the adapter's name: its class, its site, and for a trained copy
    # (modules_to_save, bias) which tensors it copies
    return {(type(m).__name__, m.site_name, getattr(m, "kind", None) if isinstance(m, FullCopy) else None): m
            for m in gm.modules() if isinstance(m, AdapterModule) and m.adapter_name == adapter_name}


def _pair_state(src: dict[tuple, AdapterModule], dst: dict[tuple, AdapterModule],
                adapter_name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(``dst``'s tensor, ``src``'s value) for every parameter and buffer, all keys and shapes checked."""
    if src.keys() != dst.keys():
        raise AdapterFileError(f"the checkpoint's adapter for {adapter_name!r} adapts other sites than the graph's "
                               f"(only in the file: {sorted(k[1] for k in src.keys() - dst.keys())[:3]}, only in the "
                               f"graph: {sorted(k[1] for k in dst.keys() - src.keys())[:3]}); was it written for "
                               "another config?")
    pairs = []
    for key, m in dst.items():
        mine, theirs = m.state_dict(keep_vars=True), src[key].state_dict(keep_vars=True)
        if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
            raise AdapterFileError(f"the checkpoint's adapter {adapter_name!r} at {key[1]!r} has other tensors or "
                                   "shapes than the graph's (another rank or config?)")
        pairs += [(mine[k], theirs[k].detach().clone()) for k in mine]  # clone: the scratch adapter goes away
    return pairs


def restore_adapters(gm: fx.GraphModule, directory: str | os.PathLike) -> None:
    """Copy the adapter weights a :func:`save_adapters` directory holds into ``gm``'s own adapters, in place.

    ``gm``'s code, parameter objects, active adapters and ``requires_grad`` flags stay as they are, so an optimizer
    built on ``gm`` (and its saved state) still fits. Each file is read with :func:`fxpeft.load_adapter` into a
    scratch adapter, which checks it fully against the graph, then copied over and the scratch adapter deleted.

    Raises:
        AdapterFileError: a directory is missing, or its adapter does not fit the graph's adapter of that name
            (other sites, ranks or method); ``gm``'s weights are then unchanged.

    Example:
        >>> import torch, fxpeft, tempfile
        >>> lin = torch.nn.Sequential(torch.nn.Linear(4, 4)); x = torch.randn(2, 4)
        >>> cfg = fxpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)  # non-zero B
        >>> gm = fxpeft.rewrite(fxpeft.trace(lin), cfg)
        >>> d = tempfile.mkdtemp(); fxpeft.save_adapters(gm, d)
        >>> fresh = fxpeft.rewrite(fxpeft.trace(lin), fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> fxpeft.restore_adapters(fresh, d)
        >>> torch.equal(fresh(x), gm(x))
        True
    """
    layout = _layout(gm)
    if not layout:
        raise AdapterFileError("the graph holds no adapter to restore into; rewrite it as it was for training first")
    for name, sub in layout.items():
        path = os.path.join(directory, sub) if sub else os.fspath(directory)
        if not os.path.isfile(os.path.join(path, _CONFIG)):
            raise AdapterFileError(f"no {_CONFIG} for adapter {name!r} in {path!r}; expected fxpeft.trainer's layout "
                                   "(one adapter, or 'default', at the root; the others in subdirectories)")
    active, grads = active_adapters(gm), {p: p.requires_grad for p in gm.parameters()}
    pairs = []
    for name, sub in layout.items():  # every file read and checked before any weight is written
        load_adapter(gm, os.path.join(directory, sub) if sub else directory, _SCRATCH)
        try:
            pairs += _pair_state(_slots(gm, _SCRATCH), _slots(gm, name), name)
        finally:
            delete_adapter(gm, _SCRATCH)
            if active_adapters(gm) != active:
                set_adapter(gm, active)
            for p, flag in grads.items():
                p.requires_grad_(flag)
    with torch.no_grad():  # in place: the optimizer (and DDP) keep the same parameter objects
        for t, value in pairs:
            t.copy_(value)


def _checkpointing(args: Any) -> bool:
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name is an alias)
    return bool(getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None))


def _has_adapter(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, _WEIGHTS))


class FxPeftTrainerMixin:
    """``Trainer`` overrides that checkpoint a rewritten graph as PEFT adapter directories (see the module doc).

    Put it first among the bases of any ``transformers.Trainer`` subclass (``class T(FxPeftTrainerMixin,
    SomeTrainer)``); :class:`FxPeftTrainer` is the mixin on ``Trainer`` itself.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model = self._fxpeft_graph()
        if not isinstance(model, fx.GraphModule):
            raise ConfigError(f"{type(self).__name__} trains a graph from fxpeft.trace/rewrite; got "
                              f"{type(model).__name__}. Use transformers.Trainer for other models")
        refused = [what for what, on in (("DeepSpeed", self.is_deepspeed_enabled), ("FSDP", self.is_fsdp_enabled),
                                         ("activation_checkpointing", _checkpointing(self.args)),
                                         ("neftune_noise_alpha", self.neftune_noise_alpha is not None)) if on]
        if refused:
            raise ConfigError(f"{type(self).__name__} does not support {', '.join(refused)} on an fxpeft graph (it has "
                              "no HF model hooks, and DeepSpeed/FSDP checkpoints bypass the adapter files); turn them "
                              "off, and scale out with DDP (torchrun / accelerate launch)")

    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        # Trainer asks DDP to look for unused parameters in every non-PreTrainedModel (an extra autograd traversal
        # per step); a graph's trainable parameters are its active adapters, which every forward uses
        args = super()._build_accelerator_args(**kwargs)
        if self.args.ddp_find_unused_parameters is None:
            for handler in args.get("kwargs_handlers", []):
                if hasattr(handler, "find_unused_parameters"):
                    handler.find_unused_parameters = False
        return args

    def _fxpeft_graph(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapters (:func:`save_adapters`) instead of the full state dict; ``state_dict`` is ignored."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:  # only the main process writes; the adapters are equal on every rank
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapters(self._fxpeft_graph(), output_dir)
        # as Trainer._save: the tokenizer and the training arguments go beside the weights
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Copy a checkpoint's adapters into the graph (:func:`restore_adapters`); a checkpoint without adapter
        files (written by a plain Trainer: the full state dict) is loaded by Trainer's own code."""
        if not _has_adapter(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_adapters(self._fxpeft_graph(), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if not _has_adapter(best):
            return super()._load_best_model()
        restore_adapters(self._fxpeft_graph(), best)


def _trainer_class() -> type:
    from transformers import Trainer

    class FxPeftTrainer(FxPeftTrainerMixin, Trainer):
        """``transformers.Trainer`` for a graph from :func:`fxpeft.rewrite`: checkpoints and ``save_model`` hold the
        PEFT adapter directory, and ``train(resume_from_checkpoint=...)`` resumes from it (see :mod:`fxpeft.trainer`).

        Trace with the keywords the batches carry, so the graph computes the loss:
        ``fxpeft.trace(model, (), {"input_ids": ids, "attention_mask": mask, "labels": ids, "use_cache": False})``
        (an HF causal LM needs ``use_cache=False`` to be captured).

        Raises:
            ConfigError: the model is not an fx graph, or DeepSpeed, FSDP, activation checkpointing or NEFTune is on.
        """

    FxPeftTrainer.__module__, FxPeftTrainer.__qualname__ = __name__, "FxPeftTrainer"
    return FxPeftTrainer


def __getattr__(name: str) -> Any:
    # transformers is imported only when FxPeftTrainer is asked for: `import fxpeft` stays light
    if name == "FxPeftTrainer":
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
