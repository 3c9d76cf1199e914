"""Strict validation of a custom resource against its CRD's ``openAPIV3Schema``.

Strict validation of a custom resource against its CustomResourceDefinition's ``openAPIV3Schema``, as the API
server's structural-schema pruning and validation would judge it, except that a field the schema does not know is
an error here (the API server would drop it silently: a typo would be lost, not reported).

Covers what the CRDs we ship against use: object properties, ``required``, ``additionalProperties``,
``x-kubernetes-preserve-unknown-fields``, ``x-kubernetes-int-or-string``, arrays with ``items``/``maxItems``,
``enum``, string lengths and ``pattern``, integer/number bounds, booleans. CEL rules (``x-kubernetes-validations``)
are not evaluated.
"""

from __future__ import annotations

import re


def crd_schema(crd: dict, api_version: str) -> dict:
    group, _, version = api_version.partition("/")
    if crd["spec"]["group"] != group:
        raise ValueError(f"{api_version}: the CRD is for group {crd['spec']['group']}")
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise ValueError(f"{api_version}: the CRD has no version {version}")


def validate(value, schema: dict, path: str = "") -> list[str]:
    where = path or "."
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            return [f"{where}: expected an integer or a string, got {type(value).__name__}"]
        return []
    t = schema.get("type")
    errors: list[str] = []
    if t == "object" or (t is None and "properties" in schema):
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {type(value).__name__}"]
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: missing required field {key!r}")
        for key, sub in value.items():
            p = f"{path}.{key}"
            if props is not None and key in props:
                errors += validate(sub, props[key], p)
            elif isinstance(extra, dict):
                errors += validate(sub, extra, p)
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields") and extra is not True:
                errors.append(f"{p}: unknown field")
        return errors
    if t == "array":
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{where}: more than {schema['maxItems']} items")
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(f"{where}: fewer than {schema['minItems']} items")
        for i, item in enumerate(value):
            errors += validate(item, schema.get("items", {}), f"{path}[{i}]")
        return errors
    if t == "string":
        if not isinstance(value, str):
            return [f"{where}: expected a string, got {type(value).__name__} ({value!r})"]
        if "enum" in schema and value not in schema["enum"]:
            errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{where}: longer than {schema['maxLength']}")
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{where}: shorter than {schema['minLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
        return errors
    if t == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            return [f"{where}: expected an integer, got {type(value).__name__} ({value!r})"]
    elif t == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return [f"{where}: expected a number, got {type(value).__name__}"]
    elif t == "boolean":
        if not isinstance(value, bool):
            return [f"{where}: expected a boolean, got {type(value).__name__}"]
        return []
    if t in ("integer", "number"):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: {value} is below {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: {value} is above {schema['maximum']}")
        if "enum" in schema and value not in schema["enum"]:
            errors.append(f"{where}: {value} is not one of {schema['enum']}")
    return errors


def validate_resource(doc: dict, crd: dict) -> list[str]:
    """Errors of ``doc`` (a custom resource) against ``crd``; empty when it is valid."""
    try:
        schema = crd_schema(crd, doc.get("apiVersion", ""))
    except ValueError as e:
        return [str(e)]
    if doc.get("kind") != crd["spec"]["names"]["kind"]:
        return [f"kind {doc.get('kind')!r} is not {crd['spec']['names']['kind']!r}"]
    return validate(doc, schema)
