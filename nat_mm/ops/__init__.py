"""Exact 2-D (dilated) neighborhood attention: `na2d` and its backend controls."""

from .functional import available_backends, last_backend, na2d, set_default_backend, use_backend

__all__ = ['available_backends', 'last_backend', 'na2d', 'set_default_backend', 'use_backend']
