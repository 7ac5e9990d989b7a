"""``transformers.Trainer`` for models carrying adapterkit adapters.

The one line a training script changes::

    from adapterkit.trainer import Trainer      # instead of: from transformers import Trainer

Everything else is transformers' Trainer. With adapters attached (through
:func:`adapterkit.attach` on any model, or the :class:`~adapterkit.AdapterMixin`
class), it

* writes checkpoints and ``save_model()`` folders in peft's format: each trained
  adapter's ``adapter_config.json`` + ``adapter_model.safetensors`` (``default`` in
  the folder, others in ``<folder>/<name>/``, heads from ``modules_to_save``
  included), and nothing of the frozen base model;
* resumes from such a checkpoint (``train(resume_from_checkpoint=...)``): the
  adapters' weights come back from the files, the optimizer, scheduler and RNG
  states from Trainer's own files, so a resumed run ends where an uninterrupted
  one does; ``load_best_model_at_end`` loads the best checkpoint's adapters;
* does every method's per-step work with no method named in the script: the
  loss gets :meth:`Adapters.regularization` added in every training step, and
  :meth:`Adapters.training_step` runs after every optimizer step (AdaLoRA's
  rank allocation), through :class:`AdapterCallback`.

transformers' own Trainer cannot do this for a model that is not a
``PeftModel``: its resume path recognises adapters only on ``PeftModel``
(``_is_peft_model``), so even a transformers model with transformers' own
``add_adapter`` adapters fails to resume (``Can't find a checkpoint index``,
transformers 5.22.2), and its save path writes the whole model for anything but
a ``PreTrainedModel`` whose peft marker is set. Other Trainer subclasses (trl's,
say) get the same behaviour from :class:`AdapterTrainerMixin`:
``class MyTrainer(AdapterTrainerMixin, SFTTrainer): pass``.

A model without adapterkit adapters trains exactly as with transformers' Trainer.
This module imports transformers; the rest of adapterkit does not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import TrainerCallback

from . import files
from .errors import AdapterStateError, CheckpointNotFoundError
from .model import Adapters, attached

__all__ = ["AdapterCallback", "AdapterTrainerMixin", "Trainer", "adapters_of", "restore_adapters", "save_adapters"]

TRAINING_ARGS_NAME = "training_args.bin"  # what Trainer._save writes beside the model files


def adapters_of(model: nn.Module | None) -> Adapters | None:
    """The :class:`Adapters` of ``model`` (a DDP/DataParallel wrapper is looked through), or ``None`` without adapters."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
    return attached(model) if isinstance(model, nn.Module) else None


def trained_adapters(adapters: Adapters) -> list[str]:
    """What a checkpoint holds: the trainable adapters (or, with none, the active ones)."""
    return [name for name in adapters.names if adapters.trainable(name)] or adapters.active


def save_adapters(adapters: Adapters, directory: str | os.PathLike[str]) -> list[str]:
    """Write the trained adapters into ``directory`` in peft's layout, replacing earlier files; returns their names."""
    names = trained_adapters(adapters)
    adapters.save(directory, names, overwrite=True)
    return names


def restore_adapters(adapters: Adapters, directory: str | os.PathLike[str]) -> list[str]:
    """Reload every trained adapter from a checkpoint folder that :func:`save_adapters` wrote; returns their names.

    Each adapter is deleted and loaded again under its name (trainable), and the
    active set is restored. Its parameters are new objects: build optimizers after
    this (Trainer creates its optimizer after loading a checkpoint).
    """
    names = trained_adapters(adapters)
    missing = [n for n in names if not files.holds_adapter(files.adapter_folder(directory, n))]
    if missing:
        raise CheckpointNotFoundError(
            f"checkpoint {str(directory)!r} holds no files for adapters {missing} (expected "
            f"{[str(files.adapter_folder(directory, n)) for n in missing]}); resume with the adapters the "
            "checkpoint was written for"
        )
    active, enabled = adapters.active, adapters.enabled
    for name in names:
        adapters.delete(name)
        adapters.load(files.adapter_folder(directory, name), name, is_trainable=True)
    adapters.set_active(active)
    if not enabled:
        adapters.disable()
    return names


class AdapterCallback(TrainerCallback):
    """Runs :meth:`Adapters.training_step` after every optimizer step (gradients still present).

    :class:`Trainer` adds it itself. With another training framework built on
    transformers' callbacks, add it and add :meth:`Adapters.regularization` to the loss.
    """

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        adapters = adapters_of(model)
        if adapters is not None:
            # Trainer counts global_step up after this event: it is the 0-based index of the step just taken.
            adapters.training_step(state.global_step)


class AdapterTrainerMixin:
    """Makes a ``transformers.Trainer`` (sub)class save, resume and step adapterkit adapters; see the module docs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(AdapterCallback)  # type: ignore[attr-defined]

    def _adapters(self) -> Adapters | None:
        return adapters_of(self.model)  # type: ignore[attr-defined]

    def compute_loss(self, model: nn.Module, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)  # type: ignore[misc]
        adapters = adapters_of(model)
        if adapters is None or not model.training:
            return result
        # As AdaLoRA's own model adds its orthogonal regularisation to the loss of each training forward.
        loss, outputs = result if return_outputs else (result, None)
        loss = loss + adapters.regularization().to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        adapters = self._adapters()
        if adapters is None:
            return super()._save(output_dir, state_dict)  # type: ignore[misc]
        args = self.args  # type: ignore[attr-defined]
        output_dir = output_dir if output_dir is not None else args.output_dir
        if not args.should_save:
            return None
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        # The adapters' tensors come from the model; a gathered full state_dict (FSDP, DeepSpeed) is not needed.
        save_adapters(adapters, output_dir)
        processor = self.processing_class  # type: ignore[attr-defined]
        if processor is None:
            processor = getattr(self.data_collator, "tokenizer", None)  # type: ignore[attr-defined]
        if processor is not None:
            processor.save_pretrained(output_dir)
        torch.save(args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        adapters = adapters_of(model if model is not None else self.model)  # type: ignore[attr-defined]
        if adapters is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        if getattr(self, "optimizer", None) is not None:
            raise AdapterStateError(
                "resuming adapters reloads their parameters, but this Trainer was given an optimizer built on the "
                "old ones (Trainer(optimizers=...)); pass optimizers=(None, None) or optimizer_cls_and_kwargs= instead"
            )
        restore_adapters(adapters, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        adapters = self._adapters()
        if adapters is None:
            return super()._load_best_model()  # type: ignore[misc]
        restore_adapters(adapters, self.state.best_model_checkpoint)  # type: ignore[attr-defined]
        return None


class Trainer(AdapterTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that saves, resumes and steps adapterkit adapters; see :mod:`adapterkit.trainer`."""
