"""
The model registry. Every model lives in one file of this folder and exposes:
    Config          a dataclass of its architecture (and model-specific training options)
    PRESETS         {"rtx3080": {...}, "tiny": {...}}: Config values of each preset
    TRAIN_PRESETS   optional: trainer defaults that differ from base_trainer.TRAIN_PRESETS
    Model           an AutoRegressiveModel subclass built from a Config

A model's name is its key in MODELS, and only there: model_module() gives the Model class that name
(model.name, which checkpoints, convert_hf.py and embed.py read), so a model file needs no `name = ...`.

    from models import create_model, MODELS
    model = create_model("baseline_gpt2", preset="tiny", n_layer=2)
    model = create_model("baseline_gpt2", preset="tiny", pos="alibi", head="clap")

Options shared by several models (each Config has those that make sense for it; check_options validates):
    pos                  learned | sinusoidal | alibi | none | rope    how positions enter (components.py)
    head                 tied | clap | clap-cosine              the output head (components.OutputHead)
    attention            causal | bidirectional                 bidirectional = an encoder (MNTP); no generate()
    alibi_bidirectional  shifted | symmetric                    ALiBi for bidirectional attention
    norm                 layer | rms                            nn.LayerNorm or nn.RMSNorm everywhere
    mlp                  gelu | relu2 | swiglu                  the blocks' MLP
    qk_norm              false | true                           RMSNorm on q and k of every head
    zero_init_proj       false | true                           residual output projections start at zero
The last four and pos=rope are the modern switches (components.py); every model has them.
"""

import dataclasses
import importlib

from auto_regressive_model import CHOICES, ModelConfigError, check_options, check_positive  # noqa: F401

MODELS = {
    "baseline_gpt2": "models.baseline_gpt2",
    "conv_attention": "models.conv_attention",
    "progressive_diverging": "models.progressive_diverging",
    "dual_mask_gpt": "models.dual_mask_gpt",
}


def model_module(name):
    """The module of a registered model; its Model class gets the registry's name. A class that names itself
    otherwise (a copied `name = ...` line, or a class registered twice) is a ModelConfigError, never a model
    that passes for another one (a subclass of baseline_gpt2's Model is not baseline_gpt2)."""
    if name not in MODELS:
        raise ModelConfigError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    module = importlib.import_module(MODELS[name])
    own = vars(module.Model).get("name")  # set in this class itself, not inherited
    if own is not None and own != name:
        raise ModelConfigError(f"{MODELS[name]}.Model is named {own!r}, but models/__init__.py registers it as "
                               f"{name!r}: the registry alone names a model (delete a `name = ...` line in its file; "
                               f"each registered model needs a Model class of its own)")
    module.Model.name = name
    return module


def model_config(name, preset="tiny", **overrides):
    """The resolved Config: dataclass defaults, then the preset's values, then overrides."""
    module = model_module(name)
    values = {}
    if preset is not None:
        if preset not in module.PRESETS:
            raise ModelConfigError(f"unknown preset {preset!r} for {name}; choose one of: "
                                   f"{', '.join(module.PRESETS)}")
        values.update(module.PRESETS[preset])
    fields = {f.name for f in dataclasses.fields(module.Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ModelConfigError(f"unknown option(s) {', '.join(unknown)} for model {name}; "
                               f"valid: {', '.join(sorted(fields))}")
    values.update(overrides)
    return module.Config(**values)


def create_model(name, preset="tiny", **overrides):
    module = model_module(name)
    return module.Model(model_config(name, preset, **overrides))
