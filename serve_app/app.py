"""The typed app builder: the one place that binds the deployment graph (see cluster/serve_config.yaml)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from ray.serve import Application

from serve_app.ingress import Ingress
from spanner.settings import load_settings


class AppArgs(BaseModel):
    settings: dict[str, Any] = Field(default_factory=dict, description="Overrides of spanner Settings")
    replicas: int | None = Field(default=None, ge=1)
    max_ongoing_requests: int | None = Field(default=None, ge=1)


def build_app(args: AppArgs | dict[str, Any]) -> Application:
    """Settings are validated here, once, then handed to every replica as plain values."""
    parsed = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    settings = load_settings(**parsed.settings)
    resolved = settings.model_dump(mode="json")
    return Ingress.options(  # type: ignore[attr-defined,no-any-return]
        num_replicas=parsed.replicas or settings.replicas,
        max_ongoing_requests=parsed.max_ongoing_requests or settings.max_ongoing_requests,
    ).bind(resolved)
