"""OpenAI-compatible serving over the rollout engine: ``ossrl serve`` (see :mod:`ossrl.serve.app`)."""

from .app import create_app, load_for_serving, serve
from .runner import EngineRunner

__all__ = ["create_app", "load_for_serving", "serve", "EngineRunner"]
