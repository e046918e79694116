"""JSON-schema checks for data from outside (tool parameters in training files, tool-call arguments): offline — a
`$ref` to another document is never fetched — and bounded — a schema that refers to itself forever or nests past
Python's recursion limit is a problem to report, never a crash."""

from __future__ import annotations

from typing import Any


def _refuse(uri: str) -> Any:
    import referencing.exceptions

    raise referencing.exceptions.NoSuchResource(ref=uri)


def _local_refs(node: Any, depth: int = 0) -> list[str]:
    if depth > 200:
        raise RecursionError("the schema is nested more than 200 levels deep")
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _local_refs(value, depth + 1)]
    if isinstance(node, list):
        return [ref for value in node for ref in _local_refs(value, depth + 1)]
    return []


def _validator(schema: dict[str, Any]) -> tuple[Any, Any]:
    """A validator whose registry fetches nothing, and a resolver rooted at `schema` (for its local `$ref`s)."""
    import jsonschema
    import referencing
    import referencing.jsonschema

    cls = jsonschema.validators.validator_for(schema)
    registry = referencing.Registry(retrieve=_refuse)
    resource = referencing.jsonschema.specification_with(
        cls.META_SCHEMA.get("$schema", ""), default=referencing.jsonschema.DRAFT202012).create_resource(schema)
    return cls(schema, registry=registry), registry.resolver_with_root(resource)


def _loops(resolver: Any, ref: str) -> bool:
    target = resolver.lookup(ref)
    for _ in range(32):  # a chain of bare references must end somewhere
        contents = target.contents
        if not (isinstance(contents, dict) and set(contents) == {"$ref"}):
            return False
        target = target.resolver.lookup(contents["$ref"])
    return True


def reference_loop(schema: Any) -> str | None:
    """The first local `$ref` that leads only to itself (a chain of bare references without end), or None. Other
    reference problems are left to whoever compiles the schema."""
    if not isinstance(schema, dict):
        return None
    try:
        _, resolver = _validator(schema)
        refs = _local_refs(schema)
    except Exception:
        return None
    for ref in refs:
        try:
            if _loops(resolver, ref):
                return f"$ref {ref!r} refers to itself without end"
        except Exception:
            continue
    return None


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why `schema` cannot be used to check instances (None when it can): not a valid schema, a `$ref` that does not
    resolve inside it, or too deep."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
        _, resolver = _validator(schema)
        for ref in _local_refs(schema):
            try:
                if _loops(resolver, ref):
                    return f"$ref {ref!r} refers to itself without end"
            except Exception:
                return f"$ref {ref!r} does not resolve inside the schema (other documents are not fetched)"
    except jsonschema.SchemaError as exc:
        return f"not a valid JSON schema: {exc.message}"
    except RecursionError:
        return "the schema is nested too deeply"
    return None


def instance_problem(instance: Any, schema: dict[str, Any]) -> str | None:
    """Why `instance` does not match `schema` (None when it does); a schema that cannot be applied says so."""
    import jsonschema

    try:
        validator, _ = _validator(schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    except RecursionError:
        return "the schema refers to itself without end"
    except Exception as exc:  # an unresolvable reference met while checking: the schema's fault, reported as such
        return f"the schema cannot be applied: {type(exc).__name__}"
    return None if error is None else error.message
