"""Anonymous identity: each browser gets an owner id in Flask's signed session cookie.

The cookie is HttpOnly and SameSite=Lax (see app.py); everything a person creates belongs
to this id, and lookups by anyone else answer 404 as if it did not exist.
"""

from __future__ import annotations

import uuid

from flask import session


def current_owner() -> str:
    owner = session.get("owner")
    if not isinstance(owner, str):
        owner = uuid.uuid4().hex
        session["owner"] = owner
        session.permanent = True
    return owner
