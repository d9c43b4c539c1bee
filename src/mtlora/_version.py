"""The package version, in a module of its own.

Why: ``mtlora.model`` writes the version into every saved adapter, and importing it from ``mtlora`` (the
package ``__init__``, which names ``mtlora.model`` for its lazy API) made an import cycle. Everything that
needs the version imports it from here; ``mtlora.__version__`` re-exports it.
"""

from __future__ import annotations

__version__ = "0.1.0"
