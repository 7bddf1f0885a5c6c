"""The model catalog (SPEC §4): what can be called, at what price.

The four seed models ship by default; a JSON file named by
``CHINWAG_MODELS_FILE`` may add models or override fields of existing ones
(a list of objects with the keys of :class:`ModelInfo` in camelCase).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ledger import Price

DEFAULT_MODEL = "amazon.nova-micro-v1:0"


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: str
    name: str
    input_per_1k: int
    output_per_1k: int
    max_tokens: int
    capabilities: tuple[str, ...] = ("text",)
    available: bool = True
    speed: int = 2  # 1 (slow) .. 3 (fast), used by recommend
    quality: int = 2  # 1 .. 3

    @property
    def price(self) -> Price:
        return Price(self.input_per_1k, self.output_per_1k)

    def public(self, provider: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "provider": provider,
            "capabilities": list(self.capabilities),
            "creditCost": {"inputPer1k": self.input_per_1k, "outputPer1k": self.output_per_1k},
            "maxTokens": self.max_tokens,
            "available": self.available,
        }


SEED_MODELS = (
    ModelInfo(
        "amazon.nova-micro-v1:0",
        "Amazon Nova Micro",
        1,
        4,
        5000,
        ("text", "chat", "code"),
        speed=3,
        quality=1,
    ),
    ModelInfo(
        "amazon.nova-lite-v1:0",
        "Amazon Nova Lite",
        2,
        8,
        5000,
        ("text", "chat", "code", "creative"),
        speed=3,
        quality=2,
    ),
    ModelInfo(
        "amazon.titan-text-express-v1",
        "Amazon Titan Text Express",
        3,
        10,
        8000,
        ("text", "chat"),
        speed=2,
        quality=1,
    ),
    ModelInfo(
        "meta.llama3-70b-instruct-v1:0",
        "Meta Llama 3 70B Instruct",
        10,
        30,
        2048,
        ("text", "chat", "code", "creative", "reasoning"),
        speed=1,
        quality=3,
    ),
)

_FIELDS = {
    "id": "id",
    "name": "name",
    "inputPer1k": "input_per_1k",
    "outputPer1k": "output_per_1k",
    "maxTokens": "max_tokens",
    "capabilities": "capabilities",
    "available": "available",
    "speed": "speed",
    "quality": "quality",
}


class Catalog:
    def __init__(self, models: tuple[ModelInfo, ...] = SEED_MODELS) -> None:
        self._models = {m.id: m for m in models}

    @classmethod
    def load(cls, path: Path | None) -> Catalog:
        catalog = cls()
        if path is not None:
            for item in json.loads(path.read_text()):
                catalog._merge(item)
        return catalog

    def _merge(self, item: dict[str, Any]) -> None:
        kwargs = {_FIELDS[k]: v for k, v in item.items() if k in _FIELDS}
        if "capabilities" in kwargs:
            kwargs["capabilities"] = tuple(kwargs["capabilities"])
        base = self._models.get(kwargs["id"])
        model = replace(base, **kwargs) if base else ModelInfo(**kwargs)
        self._models[model.id] = model

    def get(self, model_id: str) -> ModelInfo | None:
        return self._models.get(model_id)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._models.values())

    def recommend(self, task_type: str, priority: str) -> tuple[ModelInfo, list[ModelInfo], str]:
        """Best available model for the task: capability first, then the priority."""
        candidates = [m for m in self if m.available]
        fit = [m for m in candidates if task_type in m.capabilities] or candidates

        def score(m: ModelInfo) -> tuple[int, ...]:
            cost = -(m.input_per_1k + m.output_per_1k)
            if priority == "speed":
                return (m.speed, m.quality, cost)
            if priority == "cost":
                return (cost, m.quality)
            return (m.quality, m.speed, cost)

        ranked = sorted(fit, key=score, reverse=True)
        best = ranked[0]
        superlative = {"speed": "fastest", "cost": "cheapest"}.get(priority, "highest-quality")
        scope = f"for {task_type} tasks" if task_type in best.capabilities else "overall"
        reason = f"{best.name} is the {superlative} available model {scope}."
        return best, ranked[1:], reason


def resolve(catalog: Catalog, model_id: str | None, default: str = DEFAULT_MODEL) -> ModelInfo:
    """The model a request names: 400 MODEL_NOT_FOUND / 503 MODEL_UNAVAILABLE."""
    from .errors import ApiError, ValidationError

    if model_id is not None and not isinstance(model_id, str):
        raise ValidationError("'modelId' must be a string.")
    model = catalog.get(model_id or default)
    if model is None:
        raise ApiError(f"Unknown model: {model_id}.", status=400, error_code="MODEL_NOT_FOUND")
    if not model.available:
        raise ApiError(
            f"Model {model.id} is not available right now.",
            status=503,
            error_code="MODEL_UNAVAILABLE",
        )
    return model
