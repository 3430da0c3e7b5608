"""JSON Schema checks for task payloads (jsonschema, Draft 2020-12)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError, ValidationError

from ratchet_server.engine import errors


class SchemaCache:
    """Compiled validators, keyed by the schema text a worker announced."""

    def __init__(self) -> None:
        self._validators: dict[str, Any] = {}

    def check_schema(self, task_id: str, schema: str) -> None:
        """Raise InvalidArgument unless `schema` is a valid JSON Schema."""
        self._validator(task_id, schema)

    def validate(self, task_id: str, schema: str, instance: Any) -> None:
        """Raise InvalidArgument, naming the first problem, unless `instance` fits."""
        validator = self._validator(task_id, schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            raise errors.InvalidArgument(
                f"payload does not match the schema of task {task_id!r} at {where}: "
                f"{error.message}")

    def _validator(self, task_id: str, schema: str) -> Any:
        validator = self._validators.get(schema)
        if validator is None:
            try:
                document = json.loads(schema)
                cls = jsonschema.validators.validator_for(document, jsonschema.Draft202012Validator)
                cls.check_schema(document)
            except (ValueError, SchemaError, ValidationError) as exc:
                raise errors.InvalidArgument(
                    f"task {task_id!r} announced an invalid JSON Schema: {exc}") from None
            validator = cls(document)
            self._validators[schema] = validator
        return validator
