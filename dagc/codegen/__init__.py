"""Codegen: a Schedule -> one Python loop module per actor, plus the driver's module."""

from dagc.codegen.render import GeneratedModule, render_actor, render_all, render_driver

__all__ = ["GeneratedModule", "render_actor", "render_driver", "render_all"]
