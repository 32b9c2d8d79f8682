"""Sub-commands of the ``acf-fast`` CLI, one module each.

Each module defines ``register(subparsers)`` that adds its parser and sets
``func`` (called with the parsed namespace, returns an exit code or None).
"""
