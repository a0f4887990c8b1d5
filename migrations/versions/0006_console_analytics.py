"""console: the analysed outcome and lead score as columns, and indexes for the calls list,
the delivery log and the analytics at 10,000+ calls

Revision ID: 0006
Revises: 0002
Create Date: 2026-12-08 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = [
    ("ix_calls_created", "calls", ["created_at", "id"]),
    ("ix_calls_status_created", "calls", ["status", "created_at"]),
    ("ix_calls_direction_created", "calls", ["direction", "created_at"]),
    ("ix_calls_outcome_created", "calls", ["outcome", "created_at"]),
    # covers the analytics' per-call figures: no table read per call
    (
        "ix_calls_analytics",
        "calls",
        ["created_at", "agent_id", "direction", "outcome", "lead_score", "started_at"],
    ),
    ("ix_turns_call_latency", "transcript_turns", ["call_id", "role", "first_media_ms"]),
    ("ix_call_events_call_type", "call_events", ["call_id", "type"]),
    ("ix_webhook_events_call_status", "webhook_events", ["call_id", "status"]),
    ("ix_webhook_events_created", "webhook_events", ["created_at", "id"]),
    ("ix_bookings_call", "bookings", ["call_id", "status"]),
]


def upgrade() -> None:
    op.add_column("calls", sa.Column("outcome", sa.String(40), nullable=True))
    op.add_column("calls", sa.Column("lead_score", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE calls SET outcome = json_extract(analysis, '$.outcome'), "
        "lead_score = CAST(json_extract(analysis, '$.lead_score') AS INTEGER) "
        "WHERE analysis IS NOT NULL AND json_valid(analysis)"
    )
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.drop_column("lead_score")
        batch_op.drop_column("outcome")
