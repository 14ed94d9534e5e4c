"""``hamacho serve``: an HTTP inspection service (FastAPI + uvicorn) with a page for people.

Install its dependencies with ``pip install 'hamacho[serve]'``; nothing here imports them until
a server is built.
"""

from __future__ import annotations
