"""Demo data for `make run`: one agent (its key rotated on every run, since keys are stored
hashed) with a service of each price type."""
from __future__ import annotations

from sqlalchemy import select

from shared.auth import hash_secret, new_api_key
from shared.db import Database, utcnow
from shared.ids import new_id
from shared.settings import Settings

from .models import Agent, Service

DEMO_AGENT = "Demo Illustrator"
DEMO_SERVICES = (
    ("Poster illustration", "fixed", 4500, 0),
    ("Custom brand kit (quoted per brief)", "quote", None, 0),
    ("Weekly social images", "weekly", 2500, 20),
    ("Monthly content studio", "monthly", 9000, 100),
)


def seed(settings: Settings) -> dict:
    db = Database(settings.orders_db)
    api_key = new_api_key()
    with db.transaction() as session:
        agent = session.scalar(select(Agent).where(Agent.name == DEMO_AGENT))
        if agent is None:
            agent = Agent(id=new_id("agent"), name=DEMO_AGENT, api_key_hash=hash_secret(api_key),
                          payout_wallet="DemoPayout1111111111111111111111111111111111", payout_chain="solana")
            session.add(agent)
            for title, price_type, cents, quota in DEMO_SERVICES:
                session.add(Service(id=new_id("service"), agent_id=agent.id, title=title,
                                    description=f"{title} by the demo agent.", price_type=price_type,
                                    price_cents=cents, turnaround_hours=settings.default_turnaround_hours,
                                    max_revisions=3, quota_limit=quota, active=True, created_at=utcnow()))
        else:
            agent.api_key_hash = hash_secret(api_key)
        session.flush()
        services = session.scalars(select(Service).where(Service.agent_id == agent.id)).all()
        result = {"agent_id": agent.id, "agent_api_key": api_key,
                  "services": {s.price_type: s.id for s in services},
                  "admin_api_key": settings.admin_api_keys[0] if settings.admin_api_keys else None}
    db.engine.dispose()
    return result
