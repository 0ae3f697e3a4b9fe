"""Typed settings: each option of the library is declared once, in a :class:`Settings` class.

A component's hyper-parameters (``RPNSettings``, ``RoIHeadSettings``, ``MaskSettings``, R-CNN's
settings) and a detector's constructor options are pydantic models: typed, range-checked and
refusing unknown names. The same declaration serves three ways in:

- Python: ``faster_rcnn("tiny", 6, rpn={"nms_thresh": 0.6})`` validates the dict when the model
  is built (``rpn.nms_thresh: Input should be a valid number`` for ``"abc"``);
- YAML: ``model.rpn`` in a config file is validated when the file is read, naming the file and
  the field;
- the command line: ``--set model.rpn.nms_thresh=0.6``.

Every number has a range, and NaN and infinities are refused everywhere (``allow_inf_nan=False``
in the model config of every settings class): ``--set model.rpn.nms_thresh=nan`` is "Input should
be a finite number", not a model that silently keeps nothing.

A settings section in a config or a builder call states only what differs from the defaults,
which may depend on the backbone (FPN or not): :meth:`Settings.overrides` is the class of such
partial settings, and :meth:`Settings.merged` applies one to a full settings object. A run folder
records the full settings object a built part holds (every field given, ``rcnn.build.resolved_config``),
so that rebuilding from the record depends on no default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_serializer, model_validator

__all__ = [
    "MAX_IMAGE_SIDE",
    "MIN_IMAGE_SIDE",
    "ImageSide",
    "IoU",
    "NonNegativeFloat",
    "NonNegativeInt",
    "Overrides",
    "PositiveFloat",
    "PositiveInt",
    "Probability",
    "Seed",
    "Settings",
    "format_validation_error",
    "validation_problems",
    "validate_options",
]

IoU = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]

# The sides of the images a model is given (the resize's ``min_size`` / ``max_size``, the example
# image of an export, a tile): 32 px at least, the coarsest feature stride of the backbones (C5 and
# the FPN's P5 are stride 32; the batch is padded to a multiple of 32), so that the deepest map has
# a cell; 4096 px at most: a 4096 x 4096 input already needs ~1 GiB for one 256-channel stride-4
# FPN map, several GiB for a forward pass. Larger images are cut into tiles (``rcnn predict --tile``).
MIN_IMAGE_SIDE = 32
MAX_IMAGE_SIDE = 4096
ImageSide = Annotated[int, Field(ge=MIN_IMAGE_SIDE, le=MAX_IMAGE_SIDE)]
# A random seed: what numpy's and torch's generators both take (0 .. 2**32 - 1).
MAX_SEED = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


# The tag pydantic puts in an error's location for each branch of a union (``int | list[int]``):
# ``constrained-int``, ``list[constrained-int]``, ``int``, ``function-after[...]``. Field names have
# no brackets or dashes and are never these type names.
_BRANCH_TAG = re.compile(r"[\w-]*\[.*\]|constrained-\w+|int|float|str|bool|bytes|none")
_CONTAINER_TYPES = ("list_type", "tuple_type", "set_type", "dict_type", "iterable_type")


def validation_problems(error: ValidationError) -> list[dict[str, Any]]:
    """``error.errors()`` with the union-branch tags taken out of each location and, for a value
    that no branch of a union takes, only the errors of the branch of its kind: for ``min_size:
    int | list[int]``, ``5000`` is "less than or equal to 4096", not also "a valid list", and
    ``[100, 5000]`` is ``min_size.1``'s problem, not also "a valid integer"."""
    kept = []
    for item in error.errors():
        loc = [p for p in item["loc"] if not (isinstance(p, str) and _BRANCH_TAG.fullmatch(p))]
        if len(loc) < len(item["loc"]):  # an error of one branch of a union
            given_container = isinstance(item.get("input"), (list, tuple, dict, set))
            if item["type"] in _CONTAINER_TYPES and not given_container:
                continue  # a scalar was given: the container branch's "should be a list" is noise
            if item["type"] not in _CONTAINER_TYPES and given_container and item["type"].endswith(("_type", "_parsing")):
                continue  # a container was given: the scalar branch's "should be a number" is noise
        kept.append({**item, "loc": tuple(loc)})
    return kept or error.errors()


def format_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem, ``prefix.field.subfield: message`` (unknown fields said plainly)."""
    lines = []
    for item in validation_problems(error):
        where = ".".join(str(p) for p in item["loc"])
        where = ".".join(part for part in (prefix, where) if part) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see docs/configs.md)"
        lines.append(f"{where}: {message}")
    return "\n".join(lines)


class Overrides(BaseModel):
    """Base of the partial settings classes made by :meth:`Settings.overrides`: every field
    optional, and only the fields that were given are dumped (so YAML keeps what the user wrote)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _from_settings(cls, value: Any) -> Any:
        if isinstance(value, Settings):  # a full settings object: all of its fields are given
            return value.model_dump()
        return value

    @model_serializer(mode="wrap")
    def _given_only(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        return {key: value for key, value in data.items() if key in self.model_fields_set}

    def given(self) -> dict[str, Any]:
        """The fields that were given, with their (validated) values."""
        return {key: getattr(self, key) for key in self.model_fields_set}


class Settings(BaseModel):
    """Base of every settings class: typed fields, unknown names refused, NaN and infinities
    refused, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @classmethod
    def overrides(cls) -> type[Overrides]:
        """The partial version of this class: the same fields and checks, each optional."""
        return _overrides_class(cls)

    def merged(self, overrides: Overrides | Mapping[str, Any] | Settings | None, what: str) -> Settings:
        """A copy with ``overrides`` applied and checked as a whole; ``ValueError`` naming ``what.field``."""
        if overrides is None:
            return self
        try:
            partial = type(self).overrides().model_validate(overrides)
            return type(self).model_validate({**self.model_dump(), **partial.given()})
        except ValidationError as exc:
            raise ValueError(format_validation_error(exc, what)) from None


@cache
def _overrides_class(cls: type[Settings]) -> type[Overrides]:
    fields: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[name] = (Optional[annotation], Field(default=None, description=info.description))
    return create_model(f"{cls.__name__}Overrides", __base__=Overrides, __doc__=f"Partial {cls.__name__}.", **fields)


def validate_options(cls: type[BaseModel], options: Mapping[str, Any], what: str) -> Any:
    """``cls.model_validate(options)``, with a ``ValueError`` naming ``what`` and the fields."""
    try:
        return cls.model_validate(dict(options))
    except ValidationError as exc:
        raise ValueError(f"{what}: " + format_validation_error(exc).replace("\n", f"\n{what}: ")) from None
