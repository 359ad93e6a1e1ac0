"""The HTTP bodies of the service: what ``/openapi.json`` declares, and how errors become those bodies.

The request models are built per app (:func:`request_models`) because their schema carries that app's
limits; the response models are fixed.
"""

# No ``from __future__ import annotations``: pydantic and FastAPI read these annotations at runtime.
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cmtl.data import as_texts

if TYPE_CHECKING:
    from cmtl.serving.server import ServeConfig


def request_models(config: "ServeConfig", tasks: list[str]) -> tuple[type[BaseModel], type[BaseModel]]:
    """The two request bodies, with this app's limits (and, as examples, the tasks served at start) in
    their schema.

    ``maxItems``/``maxLength`` are declared, not validated by pydantic: going over them is a
    413 with the limit named (see ``check_limits`` in :func:`~cmtl.serving.server.create_app`), not a 422. An
    unknown field is a 422 naming it (``additionalProperties: false``): a typo such as
    ``"merg"`` would otherwise be answered through another route.
    """
    limits = {"maxItems": config.max_texts, "items": {"type": "string", "maxLength": config.max_chars}}

    def valid_unicode(texts: list[str] | None) -> list[str] | None:
        return None if texts is None else as_texts(texts)  # DataError (a ValueError) → 422: a lone surrogate

    class PredictRequest(BaseModel):
        """Body of ``POST /v1/predict``."""

        model_config = ConfigDict(extra="forbid")

        task: str = Field(description="Task name, see GET /v1/tasks.", examples=tasks[:3] or None)
        texts: list[str] = Field(min_length=1, json_schema_extra=limits,
                                 description=f"Texts to classify (at most {config.max_texts}, each at most "
                                             f"{config.max_chars} characters).")
        text_pairs: list[str] | None = Field(
            default=None, json_schema_extra=limits,
            description="For a task on text pairs (text_pair in GET /v1/tasks): the second text of each pair, one "
                        "per text. Leave it out for other tasks.")
        merge: str | None = Field(default=None, description="Serve the task through this merged entry.")
        _unicode = field_validator("texts", "text_pairs")(valid_unicode)

    class PredictAllRequest(BaseModel):
        """Body of ``POST /v1/predict/all``."""

        model_config = ConfigDict(extra="forbid")

        texts: list[str] = Field(min_length=1, json_schema_extra=limits,
                                 description=f"Texts to classify with every task (at most {config.max_texts}, "
                                             f"each at most {config.max_chars} characters).")
        _unicode = field_validator("texts")(valid_unicode)

    return PredictRequest, PredictAllRequest


class Health(BaseModel):
    """Body of ``GET /healthz``."""

    status: Literal["ok", "degraded"] = Field(
        description="'degraded' while the registry's newest state cannot be loaded (see error).")
    generation: int | None = Field(description="The registry generation being served.")
    tasks: int = Field(description="Tasks served.")
    stale: bool = Field(description="Whether the registry on disk changed but could not be loaded.")
    generation_on_disk: Any = Field(default=None, description="When stale: the generation in registry.json.")
    error: str | None = Field(default=None, description="When stale: why the newest state could not be loaded.")
    stale_seconds: float | None = Field(default=None, description="When stale: seconds since the first failure.")


class ErrorResponse(BaseModel):
    """An error: what was wrong and how to fix it."""

    detail: str


class TaskNotFoundResponse(BaseModel):
    """An unknown task or merged entry, with what the registry serves."""

    detail: str
    tasks: list[str]
    merges: dict[str, list[str]]


class ValidationIssue(BaseModel):
    """One reason a request body was refused: where (``["body", "texts", 3]``), what, and its kind."""

    loc: list[str | int]
    msg: str
    type: str
    ctx: dict[str, Any] | None = None


class ValidationErrorResponse(BaseModel):
    """A request body that does not fit the schema."""

    detail: list[ValidationIssue]


BAD_BODY = {
    400: {"model": ErrorResponse, "description": "The body could not be read as JSON text."},
    413: {"model": ErrorResponse, "description": "Body, number of texts or a text over the limits."},
    422: {"model": ValidationErrorResponse, "description": "A body that does not fit the schema."},
}


class TooLarge(Exception):
    """Texts over the app's limits (answered with 413)."""


def validation_issue(error: dict[str, Any]) -> dict[str, Any]:
    """One pydantic error as the schema's ValidationIssue: ``loc`` a list, ``ctx`` JSON values; the
    rejected ``input`` is not echoed (it may be large, or not encodable)."""
    out = {"loc": [p if isinstance(p, (str, int)) else str(p) for p in error.get("loc", ())],
           "msg": str(error.get("msg", "")), "type": str(error.get("type", ""))}
    if isinstance(error.get("ctx"), dict):
        out["ctx"] = {str(k): v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
                      for k, v in error["ctx"].items()}
    return out
