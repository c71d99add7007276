"""Each web service answers /healthz, and /readyz reports its dependencies."""
from services.messaging.app import create_app as create_messaging


def test_orders_health_and_readiness(api):
    assert api.get("/healthz")[1]["data"]["status"] == "ok"
    status, body = api.get("/readyz")
    assert status == 200 and body["data"]["checks"] == {"database": True, "redis": True}


def test_orders_not_ready_without_redis(make_app):
    from tests.support.api import ApiClient
    api = ApiClient(make_app(redis_url="redis://127.0.0.1:1/0"))
    status, body = api.get("/readyz")
    assert (status, body["code"]) == (503, "not_ready") and body["details"]["checks"]["redis"] is False
    assert api.get("/healthz")[0] == 200  # alive, just not ready


def test_messaging_health(settings):
    client = create_messaging(settings).test_client()
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
