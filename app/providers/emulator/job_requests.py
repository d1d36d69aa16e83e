"""Turning a `POST /v1/fine_tuning/jobs` body into a stored job, with OpenAI's checks.

Bad requests (unknown model or file, bad hyperparameters, too much metadata) answer 400 at once;
a bad training file does not: like OpenAI, the job is created and fails after validation.
"""

from __future__ import annotations

import random
from typing import Any

from app.providers.emulator.catalog import BASE_MODELS
from app.providers.emulator.errors import bad_request, invalid_value, missing_parameter
from app.providers.emulator.lifecycle import Clock, resolve_plan
from app.providers.emulator.params import optional_int, optional_object, optional_str, required_str
from app.providers.emulator.state import EmulatorState, StoredJob, random_id
from app.providers.emulator.training_data import (
    InvalidTrainingFile,
    TrainingData,
    check_training_file,
)

METHODS = ("supervised", "dpo", "reinforcement")
MAX_SUFFIX = 64
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


def _model(state: EmulatorState, model: str) -> tuple[str, str, frozenset[str], dict[str, str]]:
    """(model as the job reports it, base snapshot, methods it supports, answers it knows)."""
    base = BASE_MODELS.get(model)
    if base is not None and base.fine_tunable:
        snapshot = base.snapshot or base.id
        return snapshot, snapshot, BASE_MODELS[snapshot].methods, {}
    tuned = state.models.get(model)
    if tuned is not None:
        parent = state.jobs[tuned.job_id]
        return model, parent.base_model, BASE_MODELS[parent.base_model].methods, parent.answers
    raise bad_request(
        f"Model {model} is not available for fine-tuning or does not exist.",
        param="model",
        code="model_not_available",
    )


def _metadata(body: dict[str, Any]) -> dict[str, str] | None:
    metadata = optional_object(body, "metadata")
    if metadata is None:
        return None
    if len(metadata) > MAX_METADATA_PAIRS:
        raise bad_request(
            "Invalid 'metadata': too many properties. Expected an object with at most "
            f"{MAX_METADATA_PAIRS} properties, but got an object with {len(metadata)} "
            "properties instead.",
            param="metadata",
            code="object_above_max_properties",
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise bad_request(
                f"Invalid 'metadata': key {key[:20]!r}... is longer than {MAX_METADATA_KEY}.",
                param="metadata",
                code="string_above_max_length",
            )
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
            raise bad_request(
                f"Invalid 'metadata.{key}': expected a string of at most {MAX_METADATA_VALUE} "
                "characters.",
                param=f"metadata.{key}",
                code="invalid_value",
            )
    return {str(k): str(v) for k, v in metadata.items()}


def _check_hyperparameter(name: str, value: Any, where: str) -> None:
    if value == "auto":
        return
    number = isinstance(value, int | float) and not isinstance(value, bool)
    whole = number and isinstance(value, int)
    problems = {
        "batch_size": not whole or not 1 <= value <= 256,
        "n_epochs": not whole or not 1 <= value <= 50,
        "learning_rate_multiplier": not number or value <= 0,
        "beta": not number or not 0 < value <= 2,
    }
    if problems.get(name, False):
        raise invalid_value(f"{where}.{name}", f"{value!r} is not 'auto' or an allowed number.")


def _hyperparameters(
    body: dict[str, Any], method_type: str, method: dict[str, Any]
) -> dict[str, Any]:
    requested: dict[str, Any] = {}
    legacy = optional_object(body, "hyperparameters") or {}
    options = method.get(method_type) or {}
    if not isinstance(options, dict):
        raise invalid_value(f"method.{method_type}", "expected an object.")
    chosen = options.get("hyperparameters") or {}
    if not isinstance(chosen, dict):
        raise invalid_value(f"method.{method_type}.hyperparameters", "expected an object.")
    for where, values in (
        ("hyperparameters", legacy),
        (f"method.{method_type}.hyperparameters", chosen),
    ):
        for name, value in values.items():
            _check_hyperparameter(name, value, where)
            requested[name] = value
    return requested


def _method(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    method = optional_object(body, "method") or {"type": "supervised"}
    method_type = method.get("type")
    if method_type is None:
        raise missing_parameter("method.type")
    if method_type not in METHODS:
        raise invalid_value("method.type", f"expected one of {', '.join(METHODS)}.")
    return str(method_type), method


def _fine_tune_file(state: EmulatorState, file_id: str, name: str) -> str:
    stored = state.files.get(file_id)
    if stored is None:
        raise bad_request(f"invalid {name}: {file_id}", param=name)
    if stored.purpose != "fine-tune":
        raise bad_request(
            f"File {file_id} has purpose '{stored.purpose}'; files used for fine-tuning must "
            "be uploaded with purpose 'fine-tune'.",
            param=name,
        )
    return file_id


def create_job(state: EmulatorState, body: dict[str, Any], now: float) -> StoredJob:
    model, base_model, methods, inherited = _model(state, required_str(body, "model"))
    training_file = _fine_tune_file(state, required_str(body, "training_file"), "training_file")
    validation_file = optional_str(body, "validation_file")
    if validation_file is not None:
        validation_file = _fine_tune_file(state, validation_file, "validation_file")
    suffix = optional_str(body, "suffix")
    if suffix is not None and len(suffix) > MAX_SUFFIX:
        raise invalid_value("suffix", f"expected at most {MAX_SUFFIX} characters.")
    seed = optional_int(body, "seed")
    metadata = _metadata(body)
    method_type, method = _method(body)
    if method_type not in methods:
        raise bad_request(
            f"Model {model} does not support the {method_type} fine-tuning method.",
            param="method.type",
            code="invalid_value",
        )
    requested = _hyperparameters(body, method_type, method)
    options = {k: v for k, v in (method.get(method_type) or {}).items() if k != "hyperparameters"}
    if method_type == "reinforcement" and "grader" not in options:
        raise missing_parameter("method.reinforcement.grader")
    integrations = body.get("integrations")
    if integrations is not None and not isinstance(integrations, list):
        raise invalid_value("integrations", "expected an array.")

    failure: dict[str, Any] | None = None
    training: TrainingData | None = None
    try:
        training = check_training_file(
            state.files[training_file].content, method=method_type, model=base_model
        )
        if validation_file is not None:
            check_training_file(
                state.files[validation_file].content,
                method=method_type,
                model=base_model,
                min_examples=1,
            )
    except InvalidTrainingFile as problem:
        which = "validation" if training is not None else "training"
        failure = {
            "code": f"invalid_{which}_file",
            "message": f"The job failed due to an invalid {which} file. {problem.message}",
            "param": f"{which}_file",
        }
    plan = None
    if training is not None and failure is None:
        plan = resolve_plan(
            requested,
            examples=training.examples,
            tokens_per_epoch=training.tokens,
            model=base_model,
            has_validation=validation_file is not None,
        )
    return StoredJob(
        id=random_id("ftjob-", 24),
        short_id=random_id("", 8),
        created=now,
        model=model,
        base_model=base_model,
        training_file=training_file,
        validation_file=validation_file,
        suffix=suffix,
        seed=seed if seed is not None else random.randint(0, 2**31 - 1),
        metadata=metadata,
        method_type=method_type,
        method_options=options,
        requested_hyperparameters=requested,
        integrations=integrations,
        clock=Clock(created=now, speed=state.speed),
        plan=plan,
        failure=failure,
        answers={**inherited, **(training.answers if training else {})},
    )
