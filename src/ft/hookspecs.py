"""Every hook of ft, grouped by the phase in which it fires.

Read this file top to bottom next to ``ft/run.py``: ``run.py`` calls these hooks in this
order. Each docstring has one summary line, then ``Called:`` (when it fires), ``Args:``
(each parameter), ``Returns:`` (the exact contract) and ``Mode:`` (how results combine):

- ``all``: every active plugin is called; the core combines the results as described.
- ``firstresult``: plugins are called until one returns something other than ``None``.

Implementations may accept any subset of a hook's parameters, so hooks can grow.
Registration hooks (config, cli, formats, optimizers, schedulers) reach every *loaded*
plugin; pipeline hooks reach only *active* plugins (essential ones and the selected
features). Hooks do not mutate their arguments unless the docstring says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ft import hookspec

if TYPE_CHECKING:  # heavy types only for type checkers; importing this module stays light
    from pathlib import Path

    import click

    from ft.config import Config, SectionRegistry
    from ft.registry import FormatRegistry, OptimizerRegistry, SchedulerRegistry


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


@hookspec
def ft_add_config(registry: SectionRegistry) -> None:
    """Declare the plugin's config section.

    Called: once per loaded plugin, before any config file is validated (also by
    ``ft schema`` and ``ft validate``).
    Args:
        registry: call ``registry.add(name, Model)`` with a pydantic model whose fields all
            have defaults and descriptions; ``name`` is the top-level YAML key (the plugin's
            name by convention).
    Returns: None (registration happens through ``registry``).
    Mode: all.
    """


@hookspec
def ft_validate_config(cfg: Config) -> list[str] | None:
    """Check rules that span sections (e.g. ``qlora`` needs ``lora``).

    Called: after the config parsed into models, before any data or model is loaded.
    Args:
        cfg: the validated config.
    Returns: a list of problems, each ``"key.path: what is wrong; how to fix it"``, or None.
        The core reports the problems of all plugins together and stops.
    Mode: all.
    """


# ---------------------------------------------------------------------------------------------
# cli
# ---------------------------------------------------------------------------------------------


@hookspec
def ft_add_commands(cli: click.Group) -> None:
    """Add click subcommands to the ``ft`` command.

    Called: when the CLI starts, once per loaded plugin, before arguments are parsed.
    Args:
        cli: the root ``click.Group``; call ``cli.add_command(cmd)``.
    Returns: None.
    Mode: all.
    """


@hookspec(firstresult=True)
def ft_load_trained(run_dir: Path, dtype: Any) -> tuple[Any, Any] | None:
    """Load a finished run's model and tokenizer for inference (``ft infer``).

    Called: by ``ft infer``, on every loaded plugin (no config selects features there).
    Args:
        run_dir: the output directory of a finished run (or a checkpoint).
        dtype: the torch dtype to load weights in.
    Returns: ``(model, tokenizer)`` if this plugin recognises what ``run_dir`` holds (the lora
        plugin: an adapter), else None. The infer plugin answers last, for full model directories.
    Mode: firstresult.
    """


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


@hookspec
def ft_register_formats(register: FormatRegistry) -> None:
    """Register dataset formats (the ``type:`` of a dataset entry).

    Called: once per loaded plugin, before config validation, so a format's entry options are
    validated and appear in the schema.
    Args:
        register: call ``register.add(name, options_model, build)`` where ``options_model`` is
            a subclass of ``ft.formats.DatasetOptions`` and ``build(cfg, entry, tokenizer)``
            returns a ``ft.formats.Tokenize`` callable turning a batch of rows into
            ``input_ids``/``labels``. A name registered twice is an error naming both plugins.
    Returns: None.
    Mode: all.
    """


@hookspec(firstresult=True)
def ft_load_dataset(cfg: Config, entry: Any) -> Any:
    """Read the rows of one dataset entry from its source.

    Called: for each entry of ``datasets:`` during data preparation, on a cache miss.
    Args:
        cfg: the validated config.
        entry: the dataset entry (its format's options model), with ``path``, ``split`` ...
    Returns: a ``ft.data.RawRows`` (rows plus where each came from and the rows dropped while
        reading, with reasons), or None if this plugin does not handle the source.
    Mode: firstresult.
    """


@hookspec
def ft_data_fingerprint(cfg: Config, entry: Any) -> str | None:
    """Contribute to the prepared-data cache key of one dataset entry.

    Called: before data preparation, for each dataset entry.
    Args:
        cfg: the validated config.
        entry: the dataset entry.
    Returns: a string that changes whenever the plugin's output for this entry would change
        (e.g. a hash of file contents), or None.
    Mode: all.
    """


@hookspec(firstresult=True)
def ft_pack(cfg: Config, dataset: Any) -> Any:
    """Pack tokenized samples into bins of ``sequence_len``.

    Called: after tokenization, only if a packing plugin is selected.
    Args:
        cfg: the validated config.
        dataset: the tokenized ``datasets.Dataset`` (``input_ids``, ``labels``).
    Returns: a packed dataset whose rows carry ``input_ids``, ``labels`` and ``position_ids``
        (restarting at 0 for each sequence), or None to leave packing to another plugin.
    Mode: firstresult.
    """


@hookspec(firstresult=True)
def ft_collator(cfg: Config, tokenizer: Any) -> Any:
    """Supply the data collator that turns rows into model inputs.

    Called: when the trainer is built.
    Args:
        cfg: the validated config.
        tokenizer: the loaded tokenizer.
    Returns: a callable ``list[dict] -> dict[str, Tensor]``, or None. The packing plugin
        answers when selected; the hf plugin answers last with a padding collator.
    Mode: firstresult.
    """


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def ft_load_tokenizer(cfg: Config) -> Any:
    """Load the tokenizer, with special tokens and a pad token set.

    Called: first in the pipeline, before data preparation.
    Args:
        cfg: the validated config.
    Returns: a transformers tokenizer, or None to let another plugin load it.
    Mode: firstresult.
    """


@hookspec
def ft_model_kwargs(cfg: Config) -> dict[str, Any] | None:
    """Contribute keyword arguments for ``from_pretrained`` (dtype, quantization_config ...).

    Called: after data preparation, before ``ft_load_model``.
    Args:
        cfg: the validated config.
    Returns: a dict of keyword arguments, or None. The core merges all dicts; a key set by two
        plugins to different values is an error naming both.
    Mode: all.
    """


@hookspec(firstresult=True)
def ft_load_model(cfg: Config, kwargs: dict[str, Any], tokenizer: Any) -> Any:
    """Load the base model.

    Called: after ``ft_model_kwargs``.
    Args:
        cfg: the validated config.
        kwargs: the merged keyword arguments for ``from_pretrained``.
        tokenizer: the loaded tokenizer (to resize embeddings for added tokens).
    Returns: a ``torch.nn.Module`` (normally a ``PreTrainedModel``), or None. The hf plugin
        is ``trylast``, so another loader can take over.
    Mode: firstresult.
    """


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@hookspec
def ft_patch_model(cfg: Config, model: Any) -> list[Any] | None:
    """Patch the model instance in place (kernels, attention implementations).

    Called: after the model is loaded, before the adapter is applied.
    Args:
        cfg: the validated config.
        model: the loaded model; this hook MUTATES it.
    Returns: a list of ``ft.patching.PatchRecord`` (what was replaced, and an ``undo`` callable
        for global patches, which the core calls when the run ends), or None.
    Mode: all.
    """


# ---------------------------------------------------------------------------------------------
# adapter
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def ft_apply_adapter(cfg: Config, model: Any) -> Any:
    """Wrap the model with a trainable adapter (LoRA ...).

    Called: after ``ft_patch_model``.
    Args:
        cfg: the validated config.
        model: the (possibly quantized, possibly patched) base model.
    Returns: the adapted model, or None to train the model as it is (full fine-tuning).
    Mode: firstresult.
    """


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


@hookspec
def ft_register_optimizers(register: OptimizerRegistry) -> None:
    """Register optimizers by name (``optimizer:`` in the config).

    Called: once per loaded plugin, before config validation.
    Args:
        register: call ``register.add(name, factory)``; ``factory`` is either a string naming a
            transformers ``OptimizerNames`` value or a callable ``(cfg, model) -> torch optimizer``.
    Returns: None.
    Mode: all.
    """


@hookspec
def ft_register_schedulers(register: SchedulerRegistry) -> None:
    """Register learning-rate schedulers by name (``lr_scheduler:`` in the config).

    Called: once per loaded plugin, before config validation.
    Args:
        register: call ``register.add(name, factory)``; ``factory`` is either a string naming a
            transformers ``SchedulerType`` or a callable
            ``(cfg, optimizer, num_training_steps) -> torch LR scheduler``.
    Returns: None.
    Mode: all.
    """


@hookspec(firstresult=True)
def ft_trainer_class(cfg: Config) -> Any:
    """Supply the Trainer class (a method plugin such as DPO supplies its own).

    Called: when the trainer is built.
    Args:
        cfg: the validated config.
    Returns: a subclass of ``transformers.Trainer``, or None for ft's default trainer.
    Mode: firstresult.
    """


@hookspec
def ft_trainer_args(cfg: Config) -> dict[str, Any] | None:
    """Contribute ``TrainingArguments`` fields (FSDP, DeepSpeed, precision ...).

    Called: when the trainer is built, after the core derived its own arguments.
    Args:
        cfg: the validated config.
    Returns: a dict of ``TrainingArguments`` fields, or None. Merged like ``ft_model_kwargs``:
        two plugins setting one field differently is an error naming both.
    Mode: all.
    """


@hookspec
def ft_callbacks(cfg: Config) -> list[Any] | None:
    """Contribute ``transformers.TrainerCallback`` instances.

    Called: when the trainer is built.
    Args:
        cfg: the validated config.
    Returns: a list of callbacks, or None. All lists are concatenated.
    Mode: all.
    """


@hookspec
def ft_before_train(cfg: Config, trainer: Any, model: Any) -> None:
    """Last look at the trainer and model before training starts.

    Called: after the trainer is built, just before ``trainer.train()``.
    Args:
        cfg: the validated config.
        trainer: the built trainer.
        model: the model being trained (adapted, patched).
    Returns: None.
    Mode: all.
    """


@hookspec
def ft_after_train(cfg: Config, trainer: Any, metrics: dict[str, Any]) -> None:
    """React to the end of training (reports, uploads).

    Called: after ``trainer.train()`` returned and the weights were saved.
    Args:
        cfg: the validated config.
        trainer: the trainer.
        metrics: the run's final metrics (steps, tokens, tokens/s, final loss ...).
    Returns: None.
    Mode: all.
    """


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def ft_save_weights(cfg: Config, trainer: Any, model: Any, output_dir: str) -> list[str] | None:
    """Write the trained weights (full model, adapter, consolidated shards ...).

    Called: after training, on every rank (a plugin decides who writes). The core then writes
    the tokenizer, the resolved config and the plugin manifest.
    Args:
        cfg: the validated config.
        trainer: the trainer (for distributed state dict gathering).
        model: the trained model.
        output_dir: the directory to write into.
    Returns: the list of files written, or None to let another plugin save.
    Mode: firstresult.
    """
