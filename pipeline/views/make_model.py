"""Regenerate `fhir_r4b_model.json`, the element table the view compiler types paths with.

Run by hand when the FHIR version changes (`python -m pipeline.views.make_model`); the
runner itself never imports fhir.resources. The table is derived from the R4B models
of fhir.resources (BSD), which are generated from the FHIR StructureDefinitions (CC0).

Format: {type name: {json element name: type}}, where type is
- `"code"`, `"HumanName"`, ...: one value of that type;
- `"HumanName*"`: a list (max cardinality `*`);
- `["Quantity", "string", ...]`: a choice element `value[x]`; the JSON key of each
  alternative is the element name followed by the capitalised type (`valueQuantity`).
Backbone elements get the class name fhir.resources gives them (`ObservationComponent`).
"""

from __future__ import annotations

import importlib
import pkgutil
import typing
from pathlib import Path

import orjson

OUT = Path(__file__).with_name("fhir_r4b_model.json")
# Python or pydantic names that fhir.resources uses for a few FHIR primitives
_RENAME = {"bool": "boolean", "str": "string", "int": "integer", "encodedBytes": "base64Binary"}


def _type_of(annotation: typing.Any) -> tuple[str, bool] | None:
    """(FHIR type name, is a list) of a pydantic field annotation."""
    many = False
    while True:
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            rest = [a for a in args if a is not type(None)]
            if len(rest) != 1:
                return None
            annotation = rest[0]
        elif origin in (list, typing.List):  # noqa: UP006 - what pydantic hands back
            many = True
            annotation = args[0]
        elif origin is typing.Annotated:
            meta = args[1]
            name = type(meta).__name__
            name = name[0].lower() + name[1:]
            return _RENAME.get(name, name), many
        else:
            name = getattr(annotation, "__name__", None) or str(annotation)
            name = name.rsplit(".", 1)[-1]
            if name.endswith("Type"):
                name = name[:-4]
            return _RENAME.get(name, name), many


def build() -> dict[str, dict[str, typing.Any]]:
    import fhir.resources.R4B as r4b
    from pydantic import BaseModel

    table: dict[str, dict[str, typing.Any]] = {}
    for info in pkgutil.iter_modules(r4b.__path__):
        if info.name.startswith(("fhirtypes", "fhirprimitive", "tests")):
            continue
        module = importlib.import_module(f"fhir.resources.R4B.{info.name}")
        for cname, cls in vars(module).items():
            if not (isinstance(cls, type) and issubclass(cls, BaseModel) and cls.__module__ == module.__name__):
                continue
            elements: dict[str, typing.Any] = {}
            for fname, field in cls.model_fields.items():
                key = field.alias or fname
                extra = field.json_schema_extra or {}
                if key.startswith("_") or not isinstance(extra, dict) or not extra.get("element_property"):
                    continue
                t = _type_of(field.annotation)
                if t is None:
                    continue
                choice = extra.get("one_of_many")
                if choice:
                    suffix = key[len(choice):]
                    alternatives = elements.setdefault(choice, [])
                    # the key spells the type with a capital: valueDateTime -> dateTime
                    alternatives.append(t[0] if t[0][0].isupper() else suffix[0].lower() + suffix[1:])
                else:
                    elements[key] = t[0] + ("*" if t[1] else "")
            if "resourceType" in cls.model_fields or elements:
                table[cname] = elements
    return table


if __name__ == "__main__":
    data = build()
    OUT.write_bytes(orjson.dumps(data, option=orjson.OPT_SORT_KEYS))
    print(f"{OUT}: {len(data)} types, {OUT.stat().st_size} bytes")
