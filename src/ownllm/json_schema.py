"""JSON-schema checks for data from outside (tool parameters in training files, tool-call arguments): offline — a
`$ref` to another document is never fetched — and bounded — a schema that refers to itself forever or nests past
Python's recursion limit is a problem to report, never a crash."""

from __future__ import annotations

import re
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


# llguidance builds a pattern's lexer states lazily, mid-generation; past ~200,000 positions (a{200000}, or
# (a{1000}){1000}) it stops with "too many expressions constructed" at the reply's first token. 150,000 still ran.
MAX_PATTERN_SIZE = 100_000
_SIZE_CAP = 10**12  # sizes are held below this: far past the limit, and no slow arithmetic on huge integers
# a count as Rust reads it: any whitespace around its numbers; more than 12 digits is more than llguidance takes
_COUNT = re.compile(r"\{\s*([0-9]{1,12})\s*(?:(,)\s*([0-9]{0,12})\s*)?\}")
_ESCAPE_WITH_BRACES = re.compile(r"\\[pPxuNk]\{[^}\\]{0,64}\}")  # bounded: one scan per escape, never to the end
# verbose mode (`(?x)`, `(?ix:...)`): whitespace and #-comments outside classes are no part of the pattern
_VERBOSE_FLAGS = re.compile(r"\(\?[a-zA-Z]*x[a-zA-Z-]*[:)]")
_VERBOSE_NOISE = re.compile(r"\\.|\[(?:\\.|[^\]\\])*\]|#[^\n]*|\s+", re.DOTALL)
# keywords whose values are data (a `pattern` key inside them is no regex), and those that map names to schemas
_DATA_KEYWORDS = frozenset({"const", "enum", "examples", "default"})
_NAMED_SCHEMAS = frozenset({"properties", "$defs", "definitions", "patternProperties", "dependentSchemas"})


def pattern_size(pattern: str) -> int:
    """How many positions `pattern` has with each counted repeat written out (`a{3}` is 3, `(ab){2,5}` 10, `a*` 1,
    `a{10}{10}` 100): about the states a regex engine that expands repeats builds. Read by a scanner of its own,
    which never fails and takes the syntax of llguidance's (Rust's) regexes and ECMA's alike: named groups, inline
    flags, `\\p{..}`; where in doubt, it counts high."""
    if _VERBOSE_FLAGS.search(pattern):  # (stripped everywhere: counts high at worst, where only a part is verbose)
        pattern = _VERBOSE_NOISE.sub(lambda found: found[0] if found[0][0] in "\\[" else "", pattern)
    position = 0

    def sequence() -> int:  # branches of one group (or of the whole pattern), until its `)`
        nonlocal position
        branches, current, last = [], 0, 0
        while position < len(pattern) and pattern[position] != ")":
            char = pattern[position]
            if char == "|":
                branches.append(current)
                current = last = 0
                position += 1
                continue
            counted = _COUNT.match(pattern, position)
            if counted or char in "*+?":
                if counted:
                    low, comma, high = counted.groups()
                    times = int(high) if high else (max(int(low), 1) if comma else int(low))
                    position = counted.end()
                else:
                    times, position = 1, position + 1
                current = min(current + last * (times - 1), _SIZE_CAP)  # the atom was counted once already
                last = min(last * times, _SIZE_CAP)
                if position < len(pattern) and pattern[position] in "?+":  # lazy, possessive
                    position += 1
                continue
            last = atom()
            current = min(current + last, _SIZE_CAP)
        branches.append(current)
        return min(sum(branches), _SIZE_CAP)

    def atom() -> int:
        nonlocal position
        char = pattern[position]
        if char == "\\":
            braced = _ESCAPE_WITH_BRACES.match(pattern, position)
            position = braced.end() if braced else position + 2
            return 1
        if char == "[":  # a class: one position, whatever it holds
            position += 1
            depth = 1
            if position < len(pattern) and pattern[position] == "^":
                position += 1
            if position < len(pattern) and pattern[position] == "]":
                position += 1
            while position < len(pattern) and depth:
                if pattern[position] == "\\":
                    position += 1
                elif pattern[position] == "[":
                    depth += 1
                elif pattern[position] == "]":
                    depth -= 1
                position += 1
            return 1
        if char == "(":
            position += 1
            if pattern.startswith("?", position):  # (?:  (?<name>  (?P<name>  (?i)  (?i:  (?=  (?!  (?<=  (?<!
                while position < len(pattern) and pattern[position] not in ":)" and not (
                        pattern[position] == ">" and pattern[position - 1] != "?"):
                    if pattern[position] in "=!" and pattern[position - 1] in "?<":
                        break
                    position += 1
                if position < len(pattern) and pattern[position] in ":>=!":
                    position += 1
            size = sequence()
            position += 1  # its `)` (or the end of an unclosed group)
            return size
        position += 1
        return 0 if char in "^$" else 1

    total = 0
    while position < len(pattern):
        total = min(total + sequence(), _SIZE_CAP)
        position += 1  # a `)` without its `(`: counted on from there
    return total


def oversized_pattern(schema: Any, depth: int = 0, *, names: bool = False) -> str | None:
    """The first regex in `schema` (a `pattern`, a `patternProperties` key) too large to compile (see
    MAX_PATTERN_SIZE), said in a sentence; None when there is none. `names`: `schema` maps names to schemas (the
    value of `properties`, `$defs`...), where a name such as "const" is a name, not a keyword."""
    if depth > 200:
        return None  # (too deep to be a schema that compiles: said by whoever compiles it)
    if isinstance(schema, dict) and not names:
        patterns = [schema["pattern"]] if isinstance(schema.get("pattern"), str) else []
        if isinstance(schema.get("patternProperties"), dict):
            patterns += list(schema["patternProperties"])
        for pattern in patterns:
            problem = pattern_problem(pattern, hint="for a length limit use maxLength")
            if problem:
                return problem
        inner = [(value, key in _NAMED_SCHEMAS) for key, value in schema.items() if key not in _DATA_KEYWORDS]
    elif isinstance(schema, (dict, list)):  # names to schemas, or a list of schemas
        inner = [(value, False) for value in (schema.values() if isinstance(schema, dict) else schema)]
    else:
        return None
    return next((found for value, named in inner if (found := oversized_pattern(value, depth + 1, names=named))),
                None)


def pattern_problem(pattern: str, hint: str = "") -> str | None:
    """Why `pattern` is too large to compile (None when it is not); `hint` says what to use instead."""
    try:
        size = pattern_size(pattern)
    except RecursionError:
        return "a pattern nests its groups too deeply"
    if size > MAX_PATTERN_SIZE:
        shown = pattern if len(pattern) <= 60 else pattern[:57] + "..."
        return (f"the pattern {shown!r} is too large: {size:,} positions once its counted repeats are written out "
                f"(at most {MAX_PATTERN_SIZE:,}{'; ' + hint if hint else ''})")
    return None
