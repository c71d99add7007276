"""Cursor pages walk a list newest first with no gap and no repeat."""


def _walk(api, path, who=None):
    seen, cursor = [], None
    while True:
        sep = "&" if "?" in path else "?"
        data = api.ok("GET", path + (f"{sep}cursor={cursor}" if cursor else ""), who)
        seen += [item["id"] for item in data["items"]]
        cursor = data["next_cursor"]
        if cursor is None:
            return seen


def test_services_pages(api):
    agent = api.agent()
    made = [api.service(agent, "fixed", title=f"Service {n}")["id"] for n in range(5)]
    other = api.agent("Other")
    api.service(other)
    assert _walk(api, f"/api/services?agent_id={agent.id}&limit=2") == list(reversed(made))
    assert len(_walk(api, "/api/services?limit=4")) == 6


def test_order_pages_and_status_filter(api):
    agent, service, buyer = api.setup()
    made = [api.order(buyer, service)["id"] for _ in range(5)]
    api.pay(buyer, made[1])
    assert _walk(api, "/api/orders?limit=2", buyer) == list(reversed(made))
    assert _walk(api, "/api/orders?status=paid&limit=1", buyer) == [made[1]]
    assert _walk(api, f"/api/agents/{agent.id}/orders?status=quoted,paid&limit=3", agent) == list(reversed(made))


def test_forged_cursors_are_400(api):
    import base64
    import json
    agent, service, buyer = api.setup()
    for forged in (["2026-01-01", "ord_x"], ["2026-01-01T00:00:00", "x"], ["not a time", "x"], [1, 2], "x"):
        cursor = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")
        for path, who in ((f"/api/orders?cursor={cursor}", buyer), (f"/api/services?cursor={cursor}", None)):
            status, body = api.get(path, who)
            assert (status, body["code"]) == (400, "validation_error"), (forged, path, body)
            assert "cursor" in body["details"]["fields"]
