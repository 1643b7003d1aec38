"""The chat page."""

from __future__ import annotations

from flask import Blueprint, current_app, render_template

from tidechat import accounts

bp = Blueprint("page", __name__)

# The page runs only its own files from static/: no inline script, no CDN, no eval.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


@bp.get("/")
def index():
    mode = current_app.config["AUTH_MODE"]
    if mode == "guest":
        accounts.current_owner()  # a new browser's identity cookie, before its first API call
    html = render_template(
        "index.html", default_model=current_app.config["DEFAULT_MODEL"], auth_mode=mode
    )
    return (
        html,
        200,
        {
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "Cache-Control": "no-cache",  # the other headers: tidechat/security.py
        },
    )
