"""Typed settings: each option of the library is declared once, in a :class:`Settings` class.

A component's hyper-parameters (``RPNSettings``, ``RoIHeadSettings``, ``MaskSettings``, R-CNN's
settings) and a detector's constructor options are pydantic models: typed, range-checked and
refusing unknown names. The same declaration serves three ways in:

- Python: ``faster_rcnn("tiny", 6, rpn={"nms_thresh": 0.6})`` validates the dict when the model
  is built (``rpn.nms_thresh: Input should be a valid number`` for ``"abc"``);
- YAML: ``model.rpn`` in a config file is validated when the file is read, naming the file and
  the field;
- the command line: ``--set model.rpn.nms_thresh=0.6``.

A settings section in a config or a builder call states only what differs from the defaults,
which may depend on the backbone (FPN or not): :meth:`Settings.overrides` is the class of such
partial settings, and :meth:`Settings.merged` applies one to a full settings object.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_serializer, model_validator

__all__ = [
    "IoU",
    "NonNegativeFloat",
    "NonNegativeInt",
    "Overrides",
    "PositiveFloat",
    "PositiveInt",
    "Probability",
    "Settings",
    "format_validation_error",
    "validate_options",
]

IoU = Annotated[float, Field(ge=0.0, le=1.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


def format_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem, ``prefix.field.subfield: message`` (unknown fields said plainly)."""
    lines = []
    for item in error.errors():
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

    model_config = ConfigDict(extra="forbid", frozen=True)

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
    """Base of every settings class: typed fields, unknown names refused, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
