"""The messaging service. Its message routes open with the messaging issue; until then they
answer 503 in the envelope so clients know to retry later rather than that the order is unknown."""
from __future__ import annotations

from flask import Flask
from flask_smorest import Api, Blueprint

from shared import errors
from shared.settings import Settings, load
from shared.web import create_base_app

messages_bp = Blueprint("messages", __name__, url_prefix="/api/orders", description="Order messages")


@messages_bp.route("/<order_id>/messages", methods=["GET", "POST"])
def messages(order_id):
    raise errors.ServiceUnavailable("Messaging is not available yet.")


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load()
    app = create_base_app("messaging", settings, {})
    app.config.update(API_TITLE="Order desk — messaging", API_VERSION="1", OPENAPI_VERSION="3.0.3",
                      OPENAPI_URL_PREFIX="/api", OPENAPI_JSON_PATH="openapi.json")
    Api(app).register_blueprint(messages_bp)
    errors.register_error_handlers(app)  # ours, not flask-smorest's: every error in the envelope
    return app
