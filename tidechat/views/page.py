"""The chat page."""

from __future__ import annotations

from flask import Blueprint, current_app, render_template

from tidechat.identity import current_owner

bp = Blueprint("page", __name__)


@bp.get("/")
def index():
    current_owner()  # give a new browser its identity cookie before its first API call
    return render_template("index.html", default_model=current_app.config["DEFAULT_MODEL"])
