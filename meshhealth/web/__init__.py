"""The packaged web pages: the node dashboard and the two local viewers.

Their files live in ``static/`` and are served by bare file name
(:func:`static_file`) by both the node's API and the viewers' servers.
"""

from __future__ import annotations

from importlib import resources

STATIC = resources.files("meshhealth") / "web" / "static"
CONTENT_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}  # UTF-8


def static_file(name: str) -> tuple[bytes, str] | None:
    """A file of ``meshhealth/web/static`` and its content type, by bare file name:
    None for a path, a hidden name, an unknown kind or a file that is not there."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    kind = CONTENT_TYPES.get(name[name.rfind(".") :] if "." in name else "")
    f = STATIC / name
    if kind is None or not f.is_file():
        return None
    return f.read_bytes(), kind
