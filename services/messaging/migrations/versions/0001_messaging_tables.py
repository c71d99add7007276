"""messaging tables

Revision ID: 0001
Revises: 
Create Date: 2026-11-29 05:52:48.279547
"""
from alembic import op
import sqlalchemy as sa
import shared.db


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('message_threads',
    sa.Column('order_id', sa.String(length=32), nullable=False),
    sa.Column('client_unread', sa.Integer(), nullable=False),
    sa.Column('agent_unread', sa.Integer(), nullable=False),
    sa.Column('message_count', sa.Integer(), nullable=False),
    sa.Column('last_message_at', shared.db.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('order_id')
    )
    op.create_table('messages',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('order_id', sa.String(length=32), nullable=False),
    sa.Column('sender_type', sa.String(length=8), nullable=False),
    sa.Column('sender_id', sa.String(length=64), nullable=False),
    sa.Column('content', sa.Text(), nullable=False),
    sa.Column('created_at', shared.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('read_at', shared.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('idempotency_key', sa.String(length=255), nullable=True),
    sa.Column('fingerprint', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id'),
    sa.UniqueConstraint('sender_type', 'sender_id', 'idempotency_key', name='uq_messages_idempotency'),
    sqlite_autoincrement=True
    )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index('ix_messages_order_seq', ['order_id', 'seq'], unique=False)

    op.create_table('messaging_outbox_events',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('event', sa.String(length=64), nullable=False),
    sa.Column('order_id', sa.String(length=32), nullable=True),
    sa.Column('sequence', sa.Integer(), nullable=False),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.Column('request_id', sa.String(length=64), nullable=True),
    sa.Column('created_at', shared.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('published_at', shared.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('messaging_outbox_events', schema=None) as batch_op:
        batch_op.create_index('ix_messaging_outbox_events_unpublished', ['published_at', 'created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('messaging_outbox_events', schema=None) as batch_op:
        batch_op.drop_index('ix_messaging_outbox_events_unpublished')

    op.drop_table('messaging_outbox_events')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('ix_messages_order_seq')

    op.drop_table('messages')
    op.drop_table('message_threads')
