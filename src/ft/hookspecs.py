"""Every hook of ft, declared once, grouped by the phase in which it fires, in the order ``ft/run.py`` calls them.

Each hook is a function here with a declaration above it, ``@spec(mode, returns, ...)``
(``ft/kernel/spec.py``), which is all the core knows of it: one generic caller
(``PluginManager.call``/``.first``/``.each``) reads the mode and checks every plugin's result
against ``returns`` (anything else is an error naming the plugin and its file:line). Modes:

- ``first``: plugins are called until one returns something other than ``None``.
- ``each``: every plugin is called; the core acts on each result in turn.
- ``merge``: every plugin returns a dict or None; a key two plugins set differently is an error naming both.
- ``concat``: every plugin returns a list or None; the lists are joined.
- ``register``: every loaded plugin fills the registry the declaration names.

Each docstring has one summary line, then ``Called:`` (when it fires), ``Args:`` (each
parameter) and ``Returns:`` (the contract in words).

The core calls a hook through pluggy one plugin at a time, so each result and each exception is
attributed to its plugin, and ``--trace`` and ``ft.tools.testing.HookRecorder`` see every call.
``@hookimpl(wrapper=True)`` works on every hook: a wrapper runs around each plugin's call of the
hook it wraps.

Implementations may accept any subset of a hook's parameters, so hooks can grow.
Registration hooks, ``ft_add_commands`` and ``ft_load_trained`` reach every *loaded* plugin
(``scope=LOADED``); pipeline hooks reach only *active* plugins (essential ones and the selected
features). Hooks do not mutate their arguments unless the docstring says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ft.kernel.spec import (
    ANYTHING,
    CONCAT,
    EACH,
    FIRST,
    LOADED,
    MERGE,
    REGISTER,
    Returns,
    dict_of,
    instance_of,
    list_of,
    spec,
)

if TYPE_CHECKING:  # heavy types only for type checkers; importing this module stays light
    from pathlib import Path

    import click

    from ft.kernel.config import Config, SectionRegistry
    from ft.kernel.methods import Method
    from ft.kernel.registry import (
        FormatRegistry,
        KeyHintRegistry,
        MethodRegistry,
        OptimizerRegistry,
        RewardRegistry,
        SchedulerRegistry,
    )

CALLABLE_COLLATOR = Returns("a callable list[row] -> dict of tensors", callable)


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------


@spec(REGISTER, registry="ft.kernel.config:SectionRegistry", into="sections")
def ft_add_config(registry: SectionRegistry) -> None:
    """Declare the plugin's config section.

    Called: once per loaded plugin, before any config file is validated (also by
    ``ft schema`` and ``ft validate``).
    Args:
        registry: call ``registry.add(name, Model)`` with a pydantic model whose fields all
            have defaults and descriptions; ``name`` is the top-level YAML key (the plugin's
            name by convention).
    Returns: None (registration happens through ``registry``).
    """


@spec(REGISTER, registry="ft.kernel.registry:FormatRegistry", into="formats")
def ft_register_formats(register: FormatRegistry) -> None:
    """Register dataset formats (the ``type:`` of a dataset entry).

    Called: once per loaded plugin, before config validation, so a format's entry options are
    validated and appear in the schema.
    Args:
        register: call ``register.add(name, options_model, build, columns=...)`` where
            ``options_model`` subclasses ``ft.api.DatasetOptions``, ``build(cfg, entry, tokenizer)``
            returns a ``ft.api.Tokenize`` callable turning a batch of rows into samples, and
            ``columns`` names the columns each sample carries (default ``input_ids``, ``labels``;
            checked against the method's). A name registered twice is an error naming both plugins.
    Returns: None.
    """


@spec(REGISTER, registry="ft.kernel.registry:MethodRegistry", into="methods")
def ft_register_methods(register: MethodRegistry) -> None:
    """Register training methods (``method:`` in the config): sft, dpo, grpo ...

    Called: once per loaded plugin, before config validation.
    Args:
        register: call ``register.add(ft.api.Method(...))``: the method's name, the row columns
            its formats must produce, its collator, Trainer (and arguments) classes, extra
            Trainer arguments, logged metrics and the features that apply to it.
    Returns: None.
    """


@spec(REGISTER, registry="ft.kernel.registry:RewardRegistry", into="rewards")
def ft_register_rewards(register: RewardRegistry) -> None:
    """Register reward functions for online RL methods (``grpo.rewards[].name`` in the config).

    Called: once per loaded plugin, before config validation.
    Args:
        register: call ``register.add(name, fn)`` with a reward function
            ``fn(prompts, completions, completion_ids, **columns) -> list[float | None]`` (one
            value per completion; None = not applicable; ``columns`` are the dataset row's other
            columns, one value per completion), or ``register.add(name, factory, options=Model)``
            where ``factory(options, cfg)`` returns such a function built from the validated
            options of the reward's config entry. A name registered twice is an error naming both.
    Returns: None.
    """


@spec(REGISTER, registry="ft.kernel.registry:OptimizerRegistry", into="optimizers")
def ft_register_optimizers(register: OptimizerRegistry) -> None:
    """Register optimizers by name (``optimizer:`` in the config).

    Called: once per loaded plugin, before config validation.
    Args:
        register: call ``register.add(name, factory)``; ``factory`` is either a string naming a
            transformers ``OptimizerNames`` value or a callable ``(cfg, model) -> torch optimizer``
            that builds param groups from the TRAINABLE parameters only (``requires_grad``), puts
            biases and norm weights in a group without weight decay, and uses
            ``cfg.learning_rate`` as its learning rate (the scheduler scales it, warmup included).
    Returns: None.
    """


@spec(REGISTER, registry="ft.kernel.registry:SchedulerRegistry", into="schedulers")
def ft_register_schedulers(register: SchedulerRegistry) -> None:
    """Register learning-rate schedulers by name (``lr_scheduler:`` in the config).

    Called: once per loaded plugin, before config validation.
    Args:
        register: call ``register.add(name, factory)``; ``factory`` is either a string naming a
            transformers ``SchedulerType`` or a callable
            ``(cfg, optimizer, num_training_steps) -> torch LR scheduler`` that multiplies the
            optimizer's learning rate, honours ``cfg.warmup_steps`` / ``cfg.warmup_ratio`` (a
            linear ramp from 0) and is stepped once per optimizer step.
    Returns: None.
    """


@spec(REGISTER, registry="ft.kernel.registry:KeyHintRegistry", into="key_hints")
def ft_register_key_hints(register: KeyHintRegistry) -> None:
    """Say what to write instead of a key ft does not know (another tool's name for a setting).

    Called: once per loaded plugin, before config validation; an unknown key in a config is
    reported with the registered hint instead of only a "did you mean".
    Args:
        register: call ``register.add(key, hint)``; ``key`` is a top-level key (``adapter``) or a
            dataset-entry key (``datasets[].field_human``, also used for ``test_datasets``);
            ``hint`` is a sentence saying what to write instead, or a callable of the key's value
            returning one. A key registered twice is an error naming both plugins.
    Returns: None.
    """


@spec(CONCAT, list_of(str, "a list of problem strings or None"), config_errors_join=True)
def ft_validate_config(cfg: Config) -> list[str] | None:
    """Check rules that span sections (e.g. ``qlora`` needs ``lora``).

    Called: after the config parsed into models (every section typed), before any data or model
    is loaded.
    Args:
        cfg: the validated config.
    Returns: a list of problems, each ``"file:line: key.path: what is wrong; how to fix it"``
        (``cfg.where("key", "path")`` gives the location), or None. Raising ``ConfigError`` works
        too. The core reports the problems of all plugins together and stops.
    """


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------


@spec(EACH, scope=LOADED)
def ft_add_commands(cli: click.Group) -> None:
    """Add click subcommands to the ``ft`` command.

    Called: once per loaded plugin, when a command the CLI does not define itself runs, or when ``ft --help``
        finds no current command cache (it lists plugin commands from a cache kept while no installed
        file changed): a command's name and help must depend only on the plugin's code and installed packages.
    Args:
        cli: the root ``click.Group``; call ``cli.add_command(cmd)`` (or use ``@cli.command()``).
    Returns: None.
    """


@spec(FIRST, Returns("a (model, tokenizer) tuple or None", lambda v: isinstance(v, tuple) and len(v) == 2),
      scope=LOADED)
def ft_load_trained(run_dir: Path, dtype: Any) -> tuple[Any, Any] | None:
    """Load a finished run's model and tokenizer for inference (``ft infer``).

    Called: by ``ft infer``, on every loaded plugin (no config selects features there).
    Args:
        run_dir: the output directory of a finished run (or a checkpoint).
        dtype: the torch dtype to load weights in.
    Returns: ``(model, tokenizer)`` if this plugin recognises what ``run_dir`` holds (the lora
        plugin: an adapter), else None. The infer plugin answers last, for full model directories.
    """


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


@spec(FIRST, ANYTHING, required="a tokenizer")
def ft_load_tokenizer(cfg: Config) -> Any:
    """Load the tokenizer, with special tokens and a pad token set.

    Called: first in the pipeline, before data preparation.
    Args:
        cfg: the validated config.
    Returns: a transformers tokenizer, or None to let another plugin load it.
    """


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


@spec(EACH, instance_of(str, "a string or None"))
def ft_data_fingerprint(cfg: Config, entry: Any) -> str | None:
    """Contribute to the prepared-data cache key of one dataset entry.

    Called: before data preparation, for each dataset entry.
    Args:
        cfg: the validated config.
        entry: the dataset entry.
    Returns: a string that changes whenever the plugin's output for this entry would change
        (e.g. a hash of file contents), or None.
    """


@spec(FIRST, ANYTHING)
def ft_load_dataset(cfg: Config, entry: Any) -> Any:
    """Read the rows of one dataset entry from its source.

    Called: for each entry of ``datasets:`` during data preparation, on a cache miss.
    Args:
        cfg: the validated config.
        entry: the dataset entry (its format's options model), with ``path``, ``split`` ...
    Returns: a ``ft.api.RawRows`` (rows plus where each came from and the rows dropped while
        reading, with reasons), or None if this plugin does not handle the source.
    """


@spec(FIRST, ANYTHING)
def ft_pack(cfg: Config, dataset: Any, method: Method) -> Any:
    """Pack tokenized samples into bins of ``sequence_len``.

    Called: after tokenization, only if a packing plugin is selected (and the method supports
    packing).
    Args:
        cfg: the validated config.
        dataset: the tokenized ``datasets.Dataset`` with the method's columns.
        method: the training method (its ``columns`` say which sequences a row holds).
    Returns: a packed dataset whose rows carry the method's columns and ``position_ids``
        (restarting at 0 for each sequence), or None to leave packing to another plugin.
    """


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------


@spec(MERGE, dict_of("model keyword argument"))
def ft_model_kwargs(cfg: Config) -> dict[str, Any] | None:
    """Contribute keyword arguments for ``from_pretrained`` (dtype, quantization_config ...).

    Called: after data preparation, before ``ft_load_model``.
    Args:
        cfg: the validated config.
    Returns: a dict of keyword arguments, or None. The core merges all dicts; a key set by two
        plugins to different values is an error naming both.
    """


@spec(FIRST, ANYTHING, required="a model")
def ft_load_model(cfg: Config, kwargs: dict[str, Any], tokenizer: Any) -> Any:
    """Load the base model.

    Called: after ``ft_model_kwargs``.
    Args:
        cfg: the validated config.
        kwargs: the merged keyword arguments for ``from_pretrained``.
        tokenizer: the loaded tokenizer (to resize embeddings for added tokens).
    Returns: a ``torch.nn.Module`` (normally a ``PreTrainedModel``), or None. The hf plugin
        is ``trylast``, so another loader can take over.
    """


@spec(EACH, list_of("ft.kernel.patching:PatchRecord", "a list of ft.api.PatchRecord or None"))
def ft_patch_model(cfg: Config, model: Any) -> list[Any] | None:
    """Patch the model instance in place (kernels, attention implementations).

    Called: after the model is loaded, before the adapter is applied.
    Args:
        cfg: the validated config.
        model: the loaded model; this hook MUTATES it.
    Returns: a list of ``ft.api.PatchRecord`` (what was replaced, an ``undo`` callable for
        global patches, which the core calls when the run ends, and optionally a ``check`` the
        core calls after the first training step), or None. Whatever the plugin changed on the
        model instance (a bound ``forward``, a swapped module) must have run by the end of the
        first training step, or the run stops naming the plugin.
    """


@spec(FIRST, ANYTHING)
def ft_apply_adapter(cfg: Config, model: Any) -> Any:
    """Wrap the model with a trainable adapter (LoRA ...).

    Called: after ``ft_patch_model``.
    Args:
        cfg: the validated config.
        model: the (possibly quantized, possibly patched) base model.
    Returns: the adapted model, or None to train the model as it is (full fine-tuning).
    """


# ---------------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------------


@spec(MERGE, dict_of("TrainingArguments field"))
def ft_trainer_args(cfg: Config) -> dict[str, Any] | None:
    """Contribute ``TrainingArguments`` fields (FSDP, DeepSpeed, precision ...).

    Called: when the trainer is built, after the core derived its own arguments.
    Args:
        cfg: the validated config.
    Returns: a dict of ``TrainingArguments`` fields, or None. Merged like ``ft_model_kwargs``:
        two plugins setting one field differently is an error naming both; a field this
        transformers version lacks is an error naming the plugin.
    """


@spec(FIRST, CALLABLE_COLLATOR)
def ft_collator(cfg: Config, tokenizer: Any, method: Method) -> Any:
    """Supply the data collator in place of the method's own (packing does).

    Called: when the trainer is built.
    Args:
        cfg: the validated config.
        tokenizer: the loaded tokenizer.
        method: the training method (its ``columns`` say what a row holds).
    Returns: a callable ``list[dict] -> dict[str, Tensor]``, or None to use the method's collator.
    """


@spec(CONCAT, list_of("transformers:TrainerCallback", "a list of transformers.TrainerCallback or None"))
def ft_callbacks(cfg: Config) -> list[Any] | None:
    """Contribute ``transformers.TrainerCallback`` instances.

    Called: when the trainer is built.
    Args:
        cfg: the validated config.
    Returns: a list of callbacks, or None. All lists are concatenated. An exception in a
        callback's event names the plugin.
    """


@spec(EACH)
def ft_before_train(cfg: Config, trainer: Any, model: Any) -> None:
    """Last look at the trainer and model before training starts; may change both in place.

    Called: after the trainer is built, just before ``trainer.train()``. Implementations MAY
    mutate the trainer and the model in place: the fsdp plugin shards the model here, the
    health plugin wraps ``trainer.training_step``. Each mutation must keep the Trainer usable
    and be safe to apply once per run.
    Args:
        cfg: the validated config.
        trainer: the built trainer.
        model: the model being trained (adapted, patched).
    Returns: None.
    """


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------


@spec(FIRST, Returns("a list of the files written, or None", lambda v: isinstance(v, (list, tuple))))
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
    """


@spec(EACH)
def ft_after_train(cfg: Config, trainer: Any, metrics: dict[str, Any]) -> None:
    """React to the end of training (reports, uploads).

    Called: after the weights and run files are saved.
    Args:
        cfg: the validated config.
        trainer: the trainer.
        metrics: the run's final metrics: ``steps``, ``epochs``, ``train_tokens``,
            ``trained_tokens``, ``seconds``, ``tokens_per_second``, ``final_loss``,
            ``train_loss``, ``eval_loss``, ``effective_batch_size``, ``samples``, ``precision``,
            ``method``, ``resumed_from``, ``warnings``, and the mean of each of the method's
            metrics over the last logging window (``method_metrics``).
    Returns: None.
    """
