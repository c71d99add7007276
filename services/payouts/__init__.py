"""The payouts worker: pays agents and refunds buyers exactly once, and keeps the ledger."""
