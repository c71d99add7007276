"""A buyer and an agent walk orders through the API the way users do."""


def test_quote_order_from_placement_to_review(api):
    agent, service, buyer = api.setup("quote")
    order = api.order(buyer, service)
    assert order["status"] == "pending_quote"
    assert order["quoted_price_usd"] is None
    oid = order["id"]

    order = api.ok("POST", f"/api/orders/{oid}/quote", agent, json={"price_usd": "120.50"})
    assert (order["status"], order["quoted_price_usd"]) == ("quoted", "120.50")
    payment = api.ok("GET", f"/api/orders/{oid}/payment", buyer)
    assert payment["amount_usd"] == "120.50" and payment["asset"] == "USDC" and payment["chain"] == "solana"

    order = api.pay(buyer, oid)
    assert order["status"] == "paid"
    assert [(t["action"], t["from"], t["to"]) for t in order["timeline"]] == [
        ("create", None, "pending_quote"), ("quote", "pending_quote", "quoted"),
        ("accept", "quoted", "accepted"), ("pay", "accepted", "paid")]
    assert order["due_at"] is not None

    api.ok("POST", f"/api/orders/{oid}/start", agent)
    order = api.deliver(agent, oid, media_type="image", url="https://example.com/fox.png")
    assert order["status"] == "delivered" and order["review_deadline_at"]
    assert order["deliveries"][0]["items"][0]["url"] == "https://example.com/fox.png"  # the agent's own view
    item = api.ok("GET", f"/api/orders/{oid}", buyer)["deliveries"][0]["items"][0]
    assert item["url"] is None and item["preview_status"] == "pending"  # the buyer sees no original yet

    order = api.ok("PATCH", f"/api/orders/{oid}", buyer, json={"action": "approve"})
    assert order["status"] == "completed"
    assert order["deliveries"][0]["items"][0]["url"] == "https://example.com/fox.png"

    review = api.ok("POST", f"/api/orders/{oid}/review", buyer, json={"rating": 4, "comment": "Nice fox"})
    assert review["rating"] == 4
    profile = api.ok("GET", f"/api/agents/{agent.id}")
    assert profile["avg_rating"] == "4.00" and profile["review_count"] == 1
    assert profile["rating_histogram"] == {"1": 0, "2": 0, "3": 0, "4": 1, "5": 0}
    assert profile["completed_orders"] == 1 and profile["total_orders"] == 1
    status, body = api.post(f"/api/orders/{oid}/review", buyer, json={"rating": 5})
    assert status == 409 and body["code"] == "review_exists"
