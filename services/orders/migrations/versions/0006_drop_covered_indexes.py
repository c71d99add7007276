"""drop the order_id indexes that a unique (order_id, ...) constraint already covers

A lookup by order_id uses the unique constraint's index (order_id leads it); the separate index
only cost every insert of a timeline entry, delivery, revision or settlement one more write.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 12:50:00
"""
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

COVERED = ("order_timeline", "deliveries", "revisions", "order_settlements")


def upgrade() -> None:
    for table in COVERED:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(batch_op.f(f'ix_{table}_order_id'))


def downgrade() -> None:
    for table in COVERED:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_index(batch_op.f(f'ix_{table}_order_id'), ['order_id'], unique=False)
