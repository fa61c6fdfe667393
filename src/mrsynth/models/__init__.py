"""The study's models, one file per family, registered by name (see :mod:`.base`)."""

from mrsynth.models.base import (
    DIRECTIONS,
    StepContext,
    TranslationModel,
    build_model,
    get_model_class,
    model_names,
    register_model,
)

__all__ = [
    "DIRECTIONS",
    "StepContext",
    "TranslationModel",
    "build_model",
    "get_model_class",
    "model_names",
    "register_model",
]
